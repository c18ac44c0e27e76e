"""A TP size that breaks several rules is refused with all of them at once: check-config (a YAML file, per instance
group) and the load (one error, a `parallel.tp` line each) name every one, in the same words, each with the
config.json key and value, what TP must divide and the TP sizes that pass every rule. The load named the first only,
so a user fixed the heads, retried, and met the MLP width; and the sizes it offered ignored a block-FP8 checkpoint's
128 edges, whose problem check-config named apart (or not at all, where TP did not divide the heads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pdlaunch.errors import ConfigError
from pdlaunch.model.checkpoint import load_checkpoint
from pdlaunch.model.loader import load_model
from tests.config.cli_helpers import check, write_model, write_yaml
from tests.helpers.fp8_checkpoints import make_block_fp8_qwen2_moe

# With --device cuda the check does not weigh this machine's memory against 12 CPU ranks.
GPUS = ["--target-gpus", "12", "--target-gpu-memory", "80"]


def _deployment(tmp_path: Path, model: Path, parallel: str) -> Path:
    return write_yaml(tmp_path, f"device: cuda\nmodel: {{path: {model}}}\nparallel: {{{parallel}}}\n"
                                "instances:\n  - {role: prefill, count: 1}\n  - {role: decode, count: 1}\n")


def _tp_lines(yaml: Path) -> dict[str, list[str]]:
    """check-config's problems about the groups' TP sizes, by the YAML key that set them (`parallel.tp`, once for
    every group taking it); it exits 1 without a traceback (`check`)."""
    result = check([str(yaml), *GPUS])
    assert result.exit_code == 1, result.output
    lines: dict[str, list[str]] = {}
    for line in result.output.splitlines():
        field, _, text = line.removeprefix("error: ").partition(": ")
        if line.startswith("error: parallel.") and field.endswith("tp"):
            lines.setdefault(field, []).append(text)
    return lines


def _load_refusal(model: Path, tp: int, expert_parallel: bool = False) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as err:
        load_model(load_checkpoint(str(model)), torch.device("cpu"), torch.float32, tp_rank=0, tp_size=tp,
                   expert_parallel=expert_parallel)
    assert str(err.value) == "\n".join(f"{field}: {text}" for field, text in err.value.problems)
    return err.value.problems


def _both(problems: list[tuple[str, str]], sizes: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Each (what, how to fix it) as check-config words it and as the load does, with the TP sizes that work."""
    hints = [(what, f"{fix}; this model splits over TP {sizes}") for what, fix in problems]
    return [f"{what}; {hint}" for what, hint in hints], [("parallel.tp", f"{what} ({hint})") for what, hint in hints]


def test_a_dense_model_every_rule_tp_breaks(tmp_path: Path) -> None:
    """12 heads, 3 KV heads, MLP 300: TP 8 breaks all three, TP 4 only the KV heads; 1, 3, 6 and 12 pass them."""
    model = write_model(tmp_path, hidden_size=192, num_attention_heads=12, num_key_value_heads=3,
                        intermediate_size=300)
    kv = ("TP {} and the model's 3 KV heads do not divide each other (config.json num_key_value_heads 3)",
          "use a TP size that divides 3 or a multiple of it")
    words, load = _both([
        ("TP 8 does not divide the model's 12 attention heads (config.json num_attention_heads 12)",
         "use a TP size that divides 12"),
        (kv[0].format(8), kv[1]),
        ("TP 8 does not divide the MLP width (config.json intermediate_size 300)", "use a TP size that divides 300")],
        "1, 3, 6, 12")
    prefill_words, _ = _both([(kv[0].format(4), kv[1])], "1, 3, 6, 12")
    yaml = _deployment(tmp_path, model, "prefill_tp: 4, decode_tp: 8")
    assert _tp_lines(yaml) == {"parallel.prefill_tp": prefill_words, "parallel.decode_tp": words}
    assert _load_refusal(model, 8) == load


# Qwen2-MoE, 4 layers (layer 1 dense): 6 experts 100 wide, a shared expert 300 wide, a dense MLP 150 wide.
QWEN2_MOE: dict[str, Any] = {
    "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": 256, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32, "intermediate_size": 150,
    "moe_intermediate_size": 100, "num_experts": 6, "num_experts_per_tok": 2, "shared_expert_intermediate_size": 300,
    "mlp_only_layers": [1], "decoder_sparse_step": 1}


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_a_moe_model_dense_experts_and_shared_expert_in_one_list(tmp_path: Path, expert_parallel: bool) -> None:
    """TP 8 divides the heads but none of the widths (with expert parallel: the number of experts, not their width).
    The checkpoint's tensors are not those of a MoE (check-config says so too): the TP rules read config.json alone,
    and the load refuses the TP size before it reads a tensor."""
    model = write_model(tmp_path, **QWEN2_MOE)
    experts = (("expert parallel over TP 8 needs the model's 6 experts to divide by it (config.json num_experts 6)",
                "use a TP size that divides 6, or turn expert parallel off for this group (enable_expert_parallel: "
                "false)") if expert_parallel else
               ("TP 8 does not divide the experts' intermediate size (config.json moe_intermediate_size 100)",
                "use a TP size that divides 100, or --enable-expert-parallel to place whole experts per rank"))
    placed = " (expert parallel places whole routed experts but splits the shared expert by TP)" \
        if expert_parallel else ""
    words, load = _both([
        ("TP 8 does not divide the dense layers' MLP width (config.json intermediate_size 150)",
         "use a TP size that divides 150"),
        experts,
        (f"TP 8 does not divide the shared expert's width (config.json shared_expert_intermediate_size 300){placed}",
         "use a TP size that divides 300")], "1, 2")
    yaml = _deployment(tmp_path, model, f"tp: 8, enable_expert_parallel: {str(expert_parallel).lower()}")
    assert _tp_lines(yaml) == {"parallel.tp": words}  # said once, not once per group
    assert _load_refusal(model, 8, expert_parallel) == load


@pytest.fixture(scope="module")
def qwen2_moe_384(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Block-FP8 Qwen2-MoE, 2 heads and 2 KV heads, 4 experts 128 wide, a shared expert 384 wide (3 blocks): TP 2
    splits every width but gives a rank 192 rows of the shared expert, half a block; TP 4 divides no head."""
    return make_block_fp8_qwen2_moe(tmp_path_factory.mktemp("fp8") / "qwen2-moe-block", shared=384)


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_block_fp8_edges_come_in_the_same_list(qwen2_moe_384: Path, tmp_path: Path, expert_parallel: bool) -> None:
    """At TP 4 the heads and the shared expert's 128 edges (96 rows a rank) are named together, and TP 2, which splits
    the model but cuts the blocks, is not offered: TP 1 is the one size that loads."""
    placed = " (expert parallel places whole routed experts but splits the shared expert by TP)" \
        if expert_parallel else ""
    words, load = _both([
        ("TP 4 does not divide the model's 2 attention heads (config.json num_attention_heads 2)",
         "use a TP size that divides 2"),
        ("TP 4 splits the block-FP8 projections shared_expert gate_proj/up_proj/down_proj (config.json "
         f"shared_expert_intermediate_size 384: 96 a rank) off the 128-wide scale blocks{placed}",
         "use a TP size whose shards are whole 128-row blocks (or a per-channel FP8 checkpoint, or the unquantized "
         "checkpoint with --quantization fp8)")], "1")
    yaml = _deployment(tmp_path, qwen2_moe_384,
                       f"prefill_tp: 4, decode_tp: 4, enable_expert_parallel: {str(expert_parallel).lower()}")
    assert _tp_lines(yaml) == {"parallel.prefill_tp": words, "parallel.decode_tp": words}
    assert _load_refusal(qwen2_moe_384, 4, expert_parallel) == load
