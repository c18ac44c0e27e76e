"""check-config's summary says, per instance group, what a user otherwise reads off several flags: whether expert
parallelism is on (MoE models only), the KV cache dtype (where a group stores fp8), and on the model line the
weights' quantization (where there is one). A dense bf16/fp32 model's summary is unchanged. --json carries the same
in `summary`, beside the fields it had."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.config.cli_helpers import check, check_json, write_model
from tests.helpers.checkpoints import make_qwen3_moe
from tests.helpers.fp8_checkpoints import make_fp8_qwen3
from tests.helpers.ports import free_port

DENSE_HEADER = "┃ group ┃ role ┃ count ┃ names ┃ tp ┃ devices ┃ node ┃ http ports ┃"


def _text(args: list[str]) -> str:
    result = check(args)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_qwen3_moe(tmp_path_factory.mktemp("moe") / "qwen3-moe")


def test_a_dense_unquantized_model_keeps_its_summary(tmp_path: Path) -> None:
    model = write_model(tmp_path)
    text = _text(["--model", str(model), "--device", "cpu"])
    assert f"model {model} dtype float32 max_model_len" in text
    assert DENSE_HEADER in text
    assert "│ 0 │ prefill │ 1 │ prefill-0 │ 1 │ cpu │ 0 │ free │" in text
    assert "│ 1 │ decode │ 1 │ decode-0 │ 1 │ cpu │ 0 │ free │" in text
    assert " weights " not in text.split(" instances ")[0] and "┃ ep ┃" not in text and "kv cache" not in text
    summary = check_json(["--model", str(model), "--device", "cpu"])["summary"]
    assert summary == {"weights_quantization": None,
                       "instances": [{"group": 0, "role": "prefill", "expert_parallel": None,
                                      "kv_cache_dtype": "float32"},
                                     {"group": 1, "role": "decode", "expert_parallel": None,
                                      "kv_cache_dtype": "float32"}]}


def test_a_moe_model_shows_expert_parallelism_per_group(moe: Path) -> None:
    args = ["--model", str(moe), "--device", "cpu", "--tp", "2", "--decode-expert-parallel"]
    text = _text(args)
    assert "┃ group ┃ role ┃ count ┃ names ┃ tp ┃ ep ┃ devices ┃ node ┃ http ports ┃" in text
    assert "│ 0 │ prefill │ 1 │ prefill-0 │ 2 │ off │ cpu │ 0 │ free │" in text
    assert "│ 1 │ decode │ 1 │ decode-0 │ 2 │ on │ cpu │ 0 │ free │" in text
    groups = check_json(args)["summary"]["instances"]
    assert [(g["role"], g["expert_parallel"]) for g in groups] == [("prefill", False), ("decode", True)]


def test_the_deployment_wide_flag_turns_ep_on_in_every_group(moe: Path) -> None:
    text = _text(["--model", str(moe), "--device", "cpu", "--tp", "2", "--enable-expert-parallel"])
    assert "│ 0 │ prefill │ 1 │ prefill-0 │ 2 │ on │" in text and "│ 1 │ decode │ 1 │ decode-0 │ 2 │ on │" in text


def test_an_fp8_kv_cache_is_on_the_model_line(tmp_path: Path) -> None:
    model = write_model(tmp_path)
    args = ["--model", str(model), "--device", "cpu", "--kv-cache-dtype", "fp8"]
    text = _text(args)
    assert "max_model_len 1024 block_size 16 kv cache fp8 on this machine (cpu)" in text, text
    assert DENSE_HEADER in text
    groups = check_json(args)["summary"]["instances"]
    assert [g["kv_cache_dtype"] for g in groups] == ["fp8", "fp8"]


def test_colocated_groups_of_different_kv_dtypes_get_a_column(tmp_path: Path) -> None:
    config = tmp_path / "deployment.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": str(write_model(tmp_path))}, "device": "cpu",
                                      "colocated": True, "proxy": {"port": free_port()},
                                      "instances": [{"role": "colocated", "kv_cache_dtype": "fp8"},
                                                    {"role": "colocated"}]}))
    text = _text([str(config)])
    assert "kv cache fp8" not in text
    assert "┃ group ┃ role ┃ count ┃ names ┃ tp ┃ kv cache ┃ devices ┃ node ┃ http ports ┃" in text, text
    assert "│ 0 │ colocated │ 1 │ colocated-0 │ 1 │ fp8 │ cpu │" in text
    assert "│ 1 │ colocated │ 1 │ colocated-1 │ 1 │ float32 │ cpu │" in text
    groups = check_json([str(config)])["summary"]["instances"]
    assert [g["kv_cache_dtype"] for g in groups] == ["fp8", "float32"]


def test_the_weights_quantization_is_on_the_model_line(tmp_path: Path) -> None:
    model = write_model(tmp_path)
    args = ["--model", str(model), "--device", "cpu", "--quantization", "fp8"]
    text = " ".join(check(args).output.split())
    assert (f"model {model} dtype float32 weights fp8 per-channel (quantized at load), dequantized to float32 on "
            "cpu max_model_len") in text, text
    assert check_json(args)["summary"]["weights_quantization"] == "fp8 per-channel (quantized at load)"
    served, _ = make_fp8_qwen3(tmp_path / "fp8", "block")
    text = _text(["--model", str(served), "--device", "cpu"])
    assert "dtype float32 weights fp8 block 128x128 (checkpoint), dequantized to float32 on cpu max_model_len" in text
    cuda = " ".join(check(["--model", str(served), "--device", "cuda", "--target-gpus", "1",
                           "--target-gpu-memory", "80"]).output.split())
    assert "weights fp8 block 128x128 (checkpoint) max_model_len" in cuda, cuda
