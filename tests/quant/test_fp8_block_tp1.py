"""Block-FP8 widths that are not whole 128-blocks at TP 1: gate and up share one fused matmul, so up starts mid-block
(and k or v in q/k/v, and a shared expert's up). check-config refuses the checkpoint once, in the load's words and
without sending the user after TP sizes: no TP size splits such a width into whole blocks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from pdlaunch.bench.make_checkpoint import make_llama3_8b_shaped
from pdlaunch.cli import app
from pdlaunch.errors import PdlaunchError
from pdlaunch.model.arch import parse_hf_config
from pdlaunch.model.checkpoint import load_checkpoint
from pdlaunch.model.loader import load_model
from pdlaunch.model.quant.block_tp import block_misaligned

# hidden 256, 2 heads of 128, 1 KV head: the attention is whole blocks at TP 1 and 2; 320 = 2.5 blocks.
SMALL = {"hidden_size": 256, "intermediate_size": 320, "num_attention_heads": 2, "num_key_value_heads": 1,
         "head_dim": 128, "vocab_size": 640}
UP_MID_BLOCK = ("block-FP8: model.layers.0.mlp.up_proj starts at row 320 of model.layers.0.mlp.gate_up_proj "
                "(gate_proj/up_proj in one matmul), not on a 128 edge, so one 128x128 scale block would cover two "
                "projections or two TP shards")
NO_TP_SIZE = ("its projection sizes are not multiples of 128 at any TP size: serve the unquantized checkpoint with "
              "--quantization fp8, or a per-channel FP8 checkpoint")


@pytest.fixture(scope="module")
def up_mid_block(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama3_8b_shaped(tmp_path_factory.mktemp("fp8") / "llama", num_layers=1, overrides=SMALL,
                                 fp8="block")


def _check(path: Path, *flags: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(app, ["check-config", "--model", str(path), "--device", "cpu", *flags])
    return result.exit_code, [line for line in result.output.splitlines() if line.startswith("error: ")]


def test_the_load_refuses_up_starting_mid_block_at_tp_1(up_mid_block: Path) -> None:
    with pytest.raises(PdlaunchError) as err:
        load_model(load_checkpoint(str(up_mid_block)), torch.device("cpu"), torch.float32)
    assert str(err.value) == f"model.path: {UP_MID_BLOCK} ({NO_TP_SIZE})"


@pytest.mark.parametrize("tp", ["1", "2"])
def test_check_config_refuses_it_once_whatever_the_tp_size(up_mid_block: Path, tp: str) -> None:
    """At TP 2 the groups' block-FP8 TP rule also named it, advising a TP size whose shards are whole blocks: there is
    none (160 rows a rank)."""
    code, errors = _check(up_mid_block, "--tp", tp)
    assert code == 1
    assert errors == [f"error: --model: {UP_MID_BLOCK}; {NO_TP_SIZE}"]


def _arch(**changes: Any) -> Any:
    hf = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "max_position_embeddings": 1024,
          **SMALL, **changes}
    return parse_hf_config(hf)


def test_block_misaligned_at_tp_1_names_the_fused_starts() -> None:
    assert block_misaligned(_arch(), 1) == ["gate_proj/up_proj (config.json intermediate_size 320)"]
    assert block_misaligned(_arch(intermediate_size=384), 1) == []
    # 3 heads of 64 (192 rows): k starts mid-block; o_proj is one projection, unsplit at TP 1
    assert block_misaligned(_arch(intermediate_size=384, num_attention_heads=3, head_dim=64), 1) == [
        "q_proj", "k_proj/v_proj"]
    # 2 heads and 1 KV head of 64: q is a block, v starts at 192
    assert block_misaligned(_arch(intermediate_size=384, head_dim=64), 1) == ["k_proj/v_proj"]


def test_a_shared_expert_off_a_block_at_tp_1() -> None:
    hf = {"architectures": ["Qwen2MoeForCausalLM"], "num_hidden_layers": 2, "max_position_embeddings": 1024,
          **SMALL, "intermediate_size": 384, "moe_intermediate_size": 128, "num_experts": 4, "num_experts_per_tok": 2,
          "shared_expert_intermediate_size": 320}
    assert block_misaligned(parse_hf_config(hf), 1) == [
        "shared_expert gate_proj/up_proj (config.json shared_expert_intermediate_size 320)"]
