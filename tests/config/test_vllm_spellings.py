"""`pdlaunch serve` takes vLLM's spellings where they mean the same thing, refuses those that mean something
else (saying what we call it), and a problem names the spelling the user typed."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest
import typer

from pdlaunch.cli import app
from pdlaunch.config.vllm_kv_transfer import kv_transfer_overrides
from tests.config.cli_helpers import assert_invalid, check, check_json, invoke, write_model, write_yaml
from tests.serving.e2e import Serve

CPU = ["--device", "cpu"]
# vLLM flags whose spelling and meaning were ours already.
SAME_AS_VLLM = ["--served-model-name", "--max-model-len", "--gpu-memory-utilization", "--block-size", "--dtype",
                "--seed", "--enforce-eager", "--enable-sleep-mode", "--chat-template", "--max-num-seqs",
                "--host", "--port", "--tensor-parallel-size", "-tp", "--max-num-batched-tokens",
                "--enable-prefix-caching", "--no-enable-prefix-caching", "--kv-transfer-config"]


def config_of(args: list[str]) -> dict:
    report = check_json([*CPU, *args])
    assert report["valid"], report["problems"]
    return report["config"]


@pytest.mark.parametrize("command", ["serve", "check-config", "smoke"])
def test_every_command_has_vllms_spellings(command: str) -> None:
    click_command = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    spellings = {o for p in click_command.params for o in [*p.opts, *p.secondary_opts]}
    assert not [s for s in SAME_AS_VLLM if s not in spellings]


@pytest.mark.parametrize("spelling", ["--tp", "--tensor-parallel-size", "-tp"])
def test_tensor_parallel_size(spelling: str) -> None:
    assert config_of(["tiny", spelling, "2"])["parallel"]["tp"] == 2


def test_max_num_batched_tokens() -> None:
    assert config_of(["tiny", "--max-num-batched-tokens", "512"])["scheduler"]["max_num_batched_tokens"] == 512


def test_prefix_caching_on_and_off(tmp_path: Path) -> None:
    assert config_of(["tiny", "--no-enable-prefix-caching"])["cache"]["enable_prefix_caching"] is False
    assert config_of(["tiny"])["cache"]["enable_prefix_caching"] is True
    off = write_yaml(tmp_path, "cache: {enable_prefix_caching: false}\n")
    assert config_of([str(off), "tiny", "--enable-prefix-caching"])["cache"]["enable_prefix_caching"] is True


def test_kv_transfer_config_for_nixl() -> None:
    text = json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both", "engine_id": "e1",
                       "kv_load_failure_policy": "fail", "kv_connector_extra_config": {"backends": ["UCX"]}})
    kv = config_of(["tiny", "--kv-transfer-config", text])["kv_transfer"]
    assert (kv["connector"], kv["engine_id"], kv["load_failure_policy"]) == ("nixl", "e1", "fail")


def test_kv_transfer_config_for_mooncake() -> None:
    values, problems = kv_transfer_overrides(json.dumps({
        "kv_connector": "MooncakeConnector", "kv_role": "kv_both",
        "kv_connector_extra_config": {"mooncake_protocol": "tcp"}}))
    assert problems == []
    assert values == {"kv_transfer.connector": "mooncake", "kv_transfer.mooncake_protocol": "tcp"}


def test_positional_model_and_config_in_either_order(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "scheduler: {max_num_seqs: 7}\n")
    model = write_model(tmp_path)
    for args in ([str(path), str(model)], [str(model), str(path)]):
        cfg = config_of(args)
        assert (cfg["model"]["path"], cfg["scheduler"]["max_num_seqs"]) == (str(model), 7)
    assert config_of(["tiny"])["model"]["path"] == "tiny"
    assert config_of([str(path), "--model", "tiny"])["model"]["path"] == "tiny"


def test_kv_offload_gb_and_the_old_yaml_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert config_of(["tiny", "--kv-offload-gb", "0.5"])["cache"]["kv_offload_gb"] == 0.5
    old = write_yaml(tmp_path, "cache: {cpu_offload_gb: 0.25}\n", "old.yaml")
    with caplog.at_level(logging.WARNING):
        assert config_of([str(old), "tiny"])["cache"]["kv_offload_gb"] == 0.25
    assert "cache.cpu_offload_gb: renamed cache.kv_offload_gb" in caplog.text
    bad_old = write_yaml(tmp_path, "cache: {cpu_offload_gb: -1}\n", "bad.yaml")
    assert_invalid(check([str(bad_old), "tiny", *CPU]), "cache.cpu_offload_gb", ">= 0")
    both = write_yaml(tmp_path, "cache: {cpu_offload_gb: 1, kv_offload_gb: 1}\n", "both.yaml")
    assert_invalid(check([str(both), "tiny", *CPU]), "cache.cpu_offload_gb", "keep only `kv_offload_gb`")


@pytest.mark.parametrize(("args", "field", "text"), [
    (["--cpu-offload-gb", "4"], "--cpu-offload-gb", "--kv-offload-gb"),
    (["--kv-transfer-config", '{"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}'],
     "--kv-transfer-config", "'LMCacheConnectorV1' is not one pdlaunch has; use NixlConnector (our nixl)"),
    (["--kv-transfer-config", '{"kv_connector": "NixlConnector", "kv_role": "kv_producer"}'],
     "--kv-transfer-config", "--prefill N / --decode N"),
    (["--kv-transfer-config", '{"kv_connector": "NixlConnector", "kv_ip": "10.0.0.1"}'],
     "--kv-transfer-config", "kv_ip has no pdlaunch equivalent; the KV handshake address is "
     "`kv_transfer.side_channel_host`"),
    (["--kv-transfer-config", json.dumps({"kv_connector": "NixlConnector",
                                          "kv_connector_extra_config": {"backends": ["GDS"]}})],
     "--kv-transfer-config", "UCX backend only"),
    (["--kv-transfer-config", json.dumps({"kv_connector": "MooncakeConnector",
                                          "kv_connector_extra_config": {"device_name": "x"}})],
     "--kv-transfer-config", "kv_connector_extra_config.device_name has no pdlaunch equivalent"),
    (["--kv-transfer-config", "{kv_connector: NixlConnector}"], "--kv-transfer-config", "not valid JSON"),
    (["--kv-transfer-config", '{"kv_load_failure_policy": "retry"}'], "--kv-transfer-config", "recompute"),
    (["--tp", "2", "-tp", "4"], "-tp", "conflicts with --tp"),
    (["--kv-connector", "storage", "--kv-transfer-config", '{"kv_connector": "NixlConnector"}'],
     "--kv-transfer-config", "conflicts with --kv-connector"),
    (["-tp", "0"], "-tp", "must be > 0"),
    (["--tensor-parallel-size", "0"], "--tensor-parallel-size", "must be > 0"),
    (["--max-num-batched-tokens", "0"], "--max-num-batched-tokens", "must be > 0"),
    (["--prompt-tokens-while-decoding", "-1"], "--prompt-tokens-while-decoding", "must be >= 0, got -1"),
])
def test_refusals_name_the_flag_and_our_spelling(args: list[str], field: str, text: str) -> None:
    result = check(["tiny", *CPU, *args])
    assert_invalid(result, field, text)
    assert field in [p["field"] for p in check_json(["tiny", *CPU, *args])["problems"]]


@pytest.mark.parametrize(("args", "text"), [
    (["meta-llama/Llama-3.1-8B"], "is neither a model nor a config file"),
    (["a.yaml", "b.yml"], "two config files given"),
    (["tiny", "demo"], "is a second model"),
    (["demo", "--model", "tiny"], "is a second model"),
])
def test_positionals_that_cannot_be_read(args: list[str], text: str) -> None:
    field = "CONFIG" if "two config" in text else "MODEL"
    assert_invalid(check([*CPU, *args]), field, text)


def test_serve_refuses_before_starting_anything() -> None:
    result = invoke(["serve", "tiny", *CPU, "--cpu-offload-gb", "1"])
    assert result.exit_code == 1
    assert "error: --cpu-offload-gb: means something else in pdlaunch" in result.output


@pytest.mark.e2e
def test_serve_with_vllm_spellings_and_a_positional_model(tmp_path: Path) -> None:
    serve = Serve(tmp_path, ["--tensor-parallel-size", "1", "tiny", "--colocated", "--no-enable-prefix-caching",
                             "--max-num-batched-tokens", "256"])
    try:
        serve.wait_ready()
        models = httpx.get(f"{serve.url}/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
        answer = httpx.post(f"{serve.url}/v1/completions", timeout=60,
                            json={"model": "tiny", "prompt": "Hello", "max_tokens": 3, "temperature": 0})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3
    finally:
        serve.stop()


def test_kv_cache_dtype_fp8_e4m3_is_fp8(tmp_path: Path) -> None:
    assert config_of(["tiny", "--kv-cache-dtype", "fp8_e4m3"])["cache"]["kv_cache_dtype"] == "fp8"
    grouped = write_yaml(tmp_path, "instances:\n  - {role: prefill, kv_cache_dtype: fp8_e4m3}\n"
                                   "  - {role: decode, kv_cache_dtype: fp8}\n")
    assert [g["kv_cache_dtype"] for g in config_of([str(grouped), "tiny"])["instances"]] == ["fp8", "fp8"]


def test_a_blank_served_model_name_is_refused() -> None:
    for name in (" ", " tiny", "tiny "):
        assert_invalid(check(["--model", "tiny", "--device", "cpu", "--served-model-name", name]),
                       "--served-model-name", "whitespace")
    assert check(["--model", "tiny", "--device", "cpu", "--served-model-name", "my model"]).exit_code == 0
