"""check-config refuses, per instance group, a TP size that does not divide a width TP splits (the dense MLP's
intermediate_size, a Qwen-MoE's dense layers, the experts', Qwen2-MoE's shared expert), naming the config.json key
and the TP sizes that work; the load refuses it in the same words as our error (a ValueError from a layer was a
traceback for the user). tests/config/test_tp_all_problems.py: a TP size that breaks several rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from pdlaunch.config.model_info import load_model_info
from pdlaunch.config.rules import roles
from pdlaunch.errors import ConfigError
from pdlaunch.model.arch import parse_hf_config
from pdlaunch.model.checkpoint import load_checkpoint
from pdlaunch.model.loader import load_model
from pdlaunch.model.tp_split import SplitProblem, split_problems
from tests.config.cli_helpers import assert_invalid, check, invoke, write_model


def gpus(count: int) -> list[str]:
    return ["--device", "cuda", "--target-gpus", str(count), "--target-gpu-memory", "80"]


# 8 heads / 4 KV heads: TP 1, 2, 4 and 8 split the attention; 260 = 4 x 65 splits over 1, 2 and 4 only.
DENSE_260 = ("TP 8 does not divide the MLP width (config.json intermediate_size 260)",
             "use a TP size that divides 260; this model splits over TP 1, 2, 4")


def test_check_config_names_the_group_whose_tp_does_not_divide_the_mlp_width(tmp_path: Path) -> None:
    model = write_model(tmp_path, intermediate_size=260)
    result = check(["--model", str(model), *gpus(12), "--prefill-tp", "4", "--decode-tp", "8"])
    assert_invalid(result, "--decode-tp", f"{DENSE_260[0]}; {DENSE_260[1]}")
    assert "--prefill-tp" not in result.output and "instances[" not in result.output
    assert check(["--model", str(model), *gpus(8), "--tp", "4"]).exit_code == 0


def test_the_load_refuses_it_in_check_config_words_as_our_error(tmp_path: Path) -> None:
    model = write_model(tmp_path, intermediate_size=260)
    with pytest.raises(ConfigError) as err:
        load_model(load_checkpoint(str(model)), torch.device("cpu"), torch.float32, tp_rank=7, tp_size=8)
    assert err.value.problems == [("parallel.tp", f"{DENSE_260[0]} ({DENSE_260[1]})")]
    assert str(err.value) == f"parallel.tp: {DENSE_260[0]} ({DENSE_260[1]})"


def test_serve_exits_1_with_one_line_naming_the_flag_and_no_traceback(tmp_path: Path) -> None:
    model = write_model(tmp_path, intermediate_size=255)
    served = invoke(["serve", "--model", str(model), "--device", "cpu", "--tp", "2",  # invoke: no traceback
                     "--log-dir", str(tmp_path / "logs")])
    assert served.exit_code == 1, served.output
    assert served.output.splitlines() == [  # once, not once per group that --tp reached
        "error: --tp: TP 2 does not divide the MLP width (config.json intermediate_size 255); use a "
        "TP size that divides 255; this model splits over TP 1"]


@pytest.mark.slow
def test_past_check_config_the_instances_load_refuses_it_without_a_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the TP rules off in serve's own check (a config checked where the checkpoint was another), both TP ranks
    of each instance refuse the model at load, naming every rule TP 2 breaks (the load named the first only): serve
    exits 1 with the messages, and no log holds a traceback (the launcher shows a log's last lines)."""
    monkeypatch.setattr(roles, "tp_problems", lambda *args: [])
    # 3 heads of 32 and 3 KV heads, 255 = 3 x 5 x 17: TP 2 divides neither; TP 3 divides both
    model = write_model(tmp_path, hidden_size=96, num_attention_heads=3, num_key_value_heads=3, intermediate_size=255)
    served = invoke(["serve", "--model", str(model), "--device", "cpu", "--tp", "2",
                     "--log-dir", str(tmp_path / "logs")])
    assert served.exit_code == 1, served.output
    said = " ".join(served.output.split())
    for what, fix in [("the model's 3 attention heads (config.json num_attention_heads 3)", "divides 3"),
                      ("the MLP width (config.json intermediate_size 255)", "divides 255")]:
        assert f"parallel.tp: TP 2 does not divide {what} (use a TP size that {fix}; this model splits over TP 1, 3)" \
            in said, served.output
    assert ("parallel.tp: TP 2 and the model's 3 KV heads do not divide each other (config.json num_key_value_heads "
            "3) (use a TP size that divides 3 or a multiple of it; this model splits over TP 1, 3)") in said
    logs = {log.name: log.read_text() for log in (tmp_path / "logs").glob("*.log")}
    assert logs and not [name for name, text in logs.items() if "Traceback" in text], logs


def _sizes(tmp_path: Path, hf: dict[str, Any], tp: int, expert_parallel: bool = False) -> list[SplitProblem]:
    """The rule's problems from config.json as check-config reads it (ModelInfo), checked equal to the load's
    (ModelArch)."""
    (tmp_path / "config.json").write_text(json.dumps(hf))
    info, problems = load_model_info(str(tmp_path))
    assert info is not None, problems
    found = split_problems(info, tp, expert_parallel)
    assert found == split_problems(parse_hf_config(hf), tp, expert_parallel)
    return found


QWEN3_MOE: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 256, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32, "vocab_size": 1000,
    "intermediate_size": 150, "moe_intermediate_size": 100, "num_experts": 6, "num_experts_per_tok": 2,
    "max_position_embeddings": 1024}


@pytest.mark.parametrize("dense", [{"mlp_only_layers": [1]}, {"decoder_sparse_step": 2}])
def test_a_qwen_moe_dense_layer_counts(tmp_path: Path, dense: dict[str, Any]) -> None:
    found = _sizes(tmp_path, {**QWEN3_MOE, **dense}, 8)
    assert [p.message for p in found] == [
        "TP 8 does not divide the dense layers' MLP width (config.json intermediate_size 150)",
        "TP 8 does not divide the experts' intermediate size (config.json moe_intermediate_size 100)"]
    assert found[0].hint == "use a TP size that divides 150; this model splits over TP 1, 2"


def test_an_all_sparse_qwen_moe_builds_no_dense_mlp(tmp_path: Path) -> None:
    """Its intermediate_size (150) is no layer's width: TP 4 splits the model."""
    assert _sizes(tmp_path, QWEN3_MOE, 4) == []
    assert [p.message for p in _sizes(tmp_path, QWEN3_MOE, 8)] == [
        "TP 8 does not divide the experts' intermediate size (config.json moe_intermediate_size 100)"]


def test_expert_parallel_splits_experts_by_count(tmp_path: Path) -> None:
    """Whole experts per rank: their width does not count, their number does (6 experts: TP 1 and 2)."""
    found = _sizes(tmp_path, QWEN3_MOE, 4, expert_parallel=True)
    assert found == [SplitProblem(
        "expert parallel over TP 4 needs the model's 6 experts to divide by it (config.json num_experts 6)",
        "use a TP size that divides 6, or turn expert parallel off for this group (enable_expert_parallel: false); "
        "this model splits over TP 1, 2")]


def test_qwen2_moe_shared_expert_is_split_by_tp_with_expert_parallel_too(tmp_path: Path) -> None:
    hf = {**QWEN3_MOE, "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
          "moe_intermediate_size": 128, "num_experts": 8, "shared_expert_intermediate_size": 300}
    for expert_parallel in (False, True):
        assert [p.message for p in _sizes(tmp_path, hf, 8, expert_parallel)] == [
            "TP 8 does not divide the shared expert's width (config.json shared_expert_intermediate_size 300)"
            + (" (expert parallel places whole routed experts but splits the shared expert by TP)"
               if expert_parallel else "")]


def test_mixtral_intermediate_size_is_the_experts_width(tmp_path: Path) -> None:
    """Mixtral builds no dense MLP: its intermediate_size is named as the experts' width, and expert parallel
    (whole experts) does not split it."""
    hf = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 256,
          "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 1000,
          "intermediate_size": 300, "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 1024}
    assert [p.message for p in _sizes(tmp_path, hf, 8)] == [
        "TP 8 does not divide the experts' intermediate size (config.json intermediate_size 300)"]
    assert _sizes(tmp_path, hf, 8, expert_parallel=True) == []


def test_heads_name_their_key(tmp_path: Path) -> None:
    hf = {**QWEN3_MOE, "num_attention_heads": 12, "num_key_value_heads": 4}
    assert [p.message for p in _sizes(tmp_path, hf, 8)][0] == (
        "TP 8 does not divide the model's 12 attention heads (config.json num_attention_heads 12)")
    assert [p.message for p in _sizes(tmp_path, hf, 6)][0] == (
        "TP 6 and the model's 4 KV heads do not divide each other (config.json num_key_value_heads 4)")
