"""Llama 3.2 shape: a tied checkpoint without lm_head.weight loads, its embedding is split over the
vocabulary under TP and serves as lm_head on every rank, the llama3 rope frequencies equal
transformers', and check-config accepts it.

Greedy parity (paged cache, engine, TP 2, PD push) runs in the shared parity tests (llama32_ckpt).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pdlaunch.config.model_info import load_model_info
from pdlaunch.model.arch import load_arch, parse_hf_config
from pdlaunch.model.checkpoint import load_checkpoint
from pdlaunch.model.loader import load_model
from pdlaunch.model.rotary import compute_inv_freq
from tests.config.cli_helpers import check
from tests.helpers.checkpoints import hf_model


def test_checkpoint_has_no_lm_head_and_loads_tied(llama32_ckpt: Path) -> None:
    with safe_open(str(llama32_ckpt / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    model = load_model(load_checkpoint(str(llama32_ckpt)), torch.device("cpu"), torch.float32)
    assert model.arch.tie_word_embeddings and model.arch.head_dim == 64 and model.arch.num_kv_heads == 2
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_tp_shards_the_tied_embedding_by_vocabulary(llama32_ckpt: Path, tp_rank: int) -> None:
    with safe_open(str(llama32_ckpt / "model.safetensors"), "pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight")  # [512, 256]
    model = load_model(load_checkpoint(str(llama32_ckpt)), torch.device("cpu"), torch.float32,
                       tp_rank=tp_rank, tp_size=2)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(model.lm_head.weight, embed[256 * tp_rank: 256 * (tp_rank + 1)], rtol=0, atol=0)


def test_llama3_rope_frequencies_equal_transformers(llama32_ckpt: Path) -> None:
    """All three llama3 regimes occur at head_dim 64 with Llama 3.2's factors (kept, smoothed, divided)."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    arch = load_arch(llama32_ckpt)
    assert arch.rope_theta == 500000.0 and arch.rope_scaling is not None
    assert arch.rope_scaling.rope_type == "llama3" and arch.rope_scaling.factor == 32.0
    ours = compute_inv_freq(arch.head_dim, arch.rope_theta, arch.rope_scaling, arch.max_position_embeddings)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](AutoConfig.from_pretrained(llama32_ckpt), "cpu")
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=0)
    plain = compute_inv_freq(arch.head_dim, arch.rope_theta, None, arch.max_position_embeddings)
    ratio = plain / ours
    assert (ratio == 1).any() and (ratio == 32).any() and ((ratio > 1) & (ratio < 32)).any()


def test_transformers_4_dialect_reads_the_same(llama32_ckpt: Path) -> None:
    """Llama 3.2's own config.json (transformers 4.x): top-level rope_theta, rope_scaling with rope_type."""
    cfg = json.loads((llama32_ckpt / "config.json").read_text())
    rope = dict(cfg.pop("rope_parameters"))
    old = {**cfg, "rope_theta": rope.pop("rope_theta"), "rope_scaling": rope, "torch_dtype": "float32"}
    assert parse_hf_config(old) == load_arch(llama32_ckpt)


def test_check_config_accepts_it_and_counts_the_tied_embedding_once(llama32_ckpt: Path) -> None:
    result = check(["--model", str(llama32_ckpt), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    info, problems = load_model_info(str(llama32_ckpt))
    assert info is not None and not problems and info.tie_word_embeddings
    assert info.num_parameters() == sum(p.numel() for p in hf_model(llama32_ckpt).parameters())
