"""Our model vs transformers in float32 on CPU: prompt logits and greedy decode through the paged cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdlaunch.model.attention_metadata import AttentionMetadata
from pdlaunch.model.checkpoint import load_checkpoint
from pdlaunch.model.loader import load_model
from tests.helpers.checkpoints import hf_greedy, hf_logits, make_llama
from tests.model.paged_runner import PagedRunner

KINDS = ["llama_ckpt", "qwen2_ckpt", "mistral_ckpt", "hybrid_ckpt", "sharded_ckpt", "qwen3_ckpt", "qwen3_tied_ckpt",
         "llama32_ckpt"]
# 21 tokens: longer than the Mistral window (8) and the hybrid window (6).
PROMPT = [507, 72, 366, 111, 44, 432, 108, 100, 33, 300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310, 311]


def _model(path: Path) -> torch.nn.Module:
    return load_model(load_checkpoint(str(path)), torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_logits_match_transformers(kind: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(kind)
    logits = PagedRunner(_model(path)).step({"a": PROMPT})["a"]
    torch.testing.assert_close(logits, hf_logits(path, PROMPT), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_decode_through_paged_cache_matches_transformers(kind: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(kind)
    ours = PagedRunner(_model(path), block_size=4).greedy(PROMPT, 16)
    assert ours == hf_greedy(path, PROMPT, 16)


@pytest.mark.parametrize("kind", ["llama_ckpt", "mistral_ckpt", "hybrid_ckpt", "qwen3_tied_ckpt"])
def test_chunked_prefill_matches_transformers(kind: str, request: pytest.FixtureRequest) -> None:
    """Prefill in chunks of 5: later chunks attend to earlier ones through the block table."""
    path = request.getfixturevalue(kind)
    ours = PagedRunner(_model(path), block_size=4).greedy(PROMPT, 10, chunk=5)
    assert ours == hf_greedy(path, PROMPT, 10)


@pytest.mark.parametrize("kind", ["llama_ckpt", "mistral_ckpt", "hybrid_ckpt", "qwen3_tied_ckpt"])
def test_mixed_batch_of_prefills_and_decodes_matches_transformers(kind: str, request: pytest.FixtureRequest) -> None:
    """Three sequences of different lengths share steps: a fresh prefill, a chunked prefill and
    decodes run in the same forward pass, and each sequence still matches HF on its own."""
    path = request.getfixturevalue(kind)
    prompts = {"a": PROMPT, "b": PROMPT[:7] + [400, 401], "c": [507] + list(range(200, 230))}
    runner = PagedRunner(_model(path), block_size=4)
    generated: dict[str, list[int]] = {s: [] for s in prompts}

    def take(seq: str, logits: torch.Tensor) -> None:
        generated[seq].append(int(logits[-1].argmax()))

    out = runner.step({"a": prompts["a"], "b": prompts["b"][:4]})
    take("a", out["a"])
    out = runner.step({"a": generated["a"][-1:], "b": prompts["b"][4:], "c": prompts["c"][:12]})
    take("a", out["a"])
    take("b", out["b"])
    out = runner.step({"c": prompts["c"][12:], "a": generated["a"][-1:], "b": generated["b"][-1:]})
    for seq in "abc":
        take(seq, out[seq])
    for _ in range(8):
        out = runner.step({seq: generated[seq][-1:] for seq in "cab"})
        for seq in "abc":
            take(seq, out[seq])
    for seq, prompt in prompts.items():
        assert generated[seq] == hf_greedy(path, prompt, len(generated[seq])), seq


def _fresh_metadata(lengths: list[int], slots: list[torch.Tensor], groups: int) -> AttentionMetadata:
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    return AttentionMetadata(
        query_start_loc=torch.tensor(starts),
        seq_lens=torch.tensor(lengths),
        context_lens=torch.zeros(len(lengths), dtype=torch.long),
        slot_mapping=slots,
        block_tables=[torch.zeros(len(lengths), 8, dtype=torch.long) for _ in range(groups)],
        max_query_len=max(lengths),
        max_seq_len=max(lengths),
        query_lens_cpu=lengths,
        seq_lens_cpu=lengths,
    )


def test_forward_without_kv_cache_runs_packed_fresh_prefills(hybrid_ckpt: Path) -> None:
    """kv_caches=[] (e.g. a profiling pass): two prompts packed in one step, each exact vs HF."""
    model = _model(hybrid_ckpt)
    a, b = PROMPT, PROMPT[3:15]
    attn = _fresh_metadata([len(a), len(b)], [torch.full((len(a) + len(b),), -1)] * 2, groups=2)
    ids = torch.tensor(a + b)
    positions = torch.tensor(list(range(len(a))) + list(range(len(b))))
    with torch.no_grad():
        logits = model.compute_logits(model(ids, positions, attn, []))
    torch.testing.assert_close(logits[: len(a)], hf_logits(hybrid_ckpt, a), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[len(a):], hf_logits(hybrid_ckpt, b), atol=1e-4, rtol=1e-4)


def test_slot_minus_one_skips_the_cache_write(llama_ckpt: Path) -> None:
    model = _model(llama_ckpt)
    arch = model.arch
    cache = torch.zeros(4, arch.num_layers, 2, 8, arch.num_kv_heads, arch.head_dim)
    slots = torch.tensor([0, -1, 2, 3])  # token 1 is not written
    attn = _fresh_metadata([4], [slots], groups=1)
    with torch.no_grad():
        model(torch.tensor(PROMPT[:4]), torch.arange(4), attn, [cache])
    written = cache[0, :, :, [0, 2, 3]]
    assert written.abs().sum(dim=(-1, -2)).min() > 0
    assert torch.count_nonzero(cache[0, :, :, 1]) == 0
    assert torch.count_nonzero(cache[1:]) == 0


@pytest.mark.parametrize("options", [{"tie": True}, {"gqa": False, "rope_scaling_llama3": False}])
def test_llama_variants_match_transformers(options: dict, tmp_path: Path) -> None:
    path = make_llama(tmp_path, seed=7, **options)
    model = _model(path)
    if options.get("tie"):
        assert model.lm_head.weight is model.model.embed_tokens.weight
    assert PagedRunner(model).greedy(PROMPT, 8) == hf_greedy(path, PROMPT, 8)
