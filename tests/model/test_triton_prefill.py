"""Paged prefill kernel == the torch path of model/attention.py (gathered keys, SDPA) on the steps the engine makes.

Kernel cases run on "cuda" (gpu marker) and on CPU tensors under TRITON_INTERPRET=1 ("interpret", in a child
pytest started with the variable set, as in test_triton_decode.py). Each case is one step: prompt chunks with and
without cached context, of lengths that fill no tile, beside decodes, over a cache whose unused and released
(out-of-window) blocks hold NaN, so any read of them poisons the output; block sizes 8 and 16, GQA groups 1, 3,
4 and 8, a non-power-of-2 head_dim, sliding windows, launches with tiles smaller than a block.
"""

from __future__ import annotations

import pytest
import torch

from pdlaunch.errors import PdlaunchError
from pdlaunch.model import triton_prefill
from pdlaunch.model.attention import paged_attention
from pdlaunch.model.attention_metadata import AttentionMetadata
from pdlaunch.model.attention_plan import build_group_plan
from pdlaunch.model.triton_prefill import PAGED_PREFILL_MAX_TOKENS, prefill_launch, prefill_tiles
from tests.model.interpreter import INTERPRET_AT_START, run_interpreter_child

POISON = 0  # block id of padded table entries and released blocks: filled with NaN


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.gpu), "interpret"])
def device(request: pytest.FixtureRequest) -> str:
    pytest.importorskip("triton")
    if request.param == "interpret" and not INTERPRET_AT_START:
        pytest.skip("runs in the child of test_interpreter_cases_in_a_subprocess")
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return request.param if request.param == "cuda" else "cpu"


def _step(device: str, dtype: torch.dtype, seqs: list[tuple[int, int]], block_size: int, num_kv_heads: int,
          group: int, head_dim: int, window: int | None, layers: int = 2, seed: int = 0
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """One step of `seqs` (context, query tokens): (cache, q [T, Hq, D], k, v [T, Hkv, D], metadata) over a
    poisoned cache whose context rows are random."""
    gen = torch.Generator().manual_seed(seed)
    free = torch.randperm(4096, generator=gen).tolist()
    free.remove(POISON)
    tables: list[list[int]] = []
    for ctx, qlen in seqs:
        n = ctx + qlen
        blocks = [free.pop() for _ in range(-(-n // block_size))]
        if window is not None:  # blocks wholly before the first query's window were released (engine: -1 -> 0)
            first = max(0, ctx - window + 1)
            blocks = [POISON if (i + 1) * block_size <= first else b for i, b in enumerate(blocks)]
        tables.append(blocks)
    width = max(len(t) for t in tables) + 2
    table = torch.tensor([t + [POISON] * (width - len(t)) for t in tables])
    used = sorted({b for t in tables for b in t} | {POISON})
    shape = (max(used) + 1, layers, 2, block_size, num_kv_heads, head_dim)
    cache = torch.full(shape, float("nan"), dtype=dtype)
    live = torch.tensor([b for b in used if b != POISON])
    cache[live] = torch.randn((len(live), *shape[1:]), generator=gen).to(dtype)
    tokens = sum(q for _, q in seqs)
    q = torch.randn(tokens, num_kv_heads * group, head_dim, generator=gen).to(dtype)
    k = torch.randn(tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    slots = [tables[i][p // block_size] * block_size + p % block_size
             for i, (ctx, qlen) in enumerate(seqs) for p in range(ctx, ctx + qlen)]
    qlens = [q_ for _, q_ in seqs]
    lens = [c + q_ for c, q_ in seqs]
    starts = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()])
    attn = AttentionMetadata(
        query_start_loc=starts.to(device), seq_lens=torch.tensor(lens).to(device),
        context_lens=torch.tensor([c for c, _ in seqs]).to(device), slot_mapping=[torch.tensor(slots).to(device)],
        block_tables=[table.to(device)], max_query_len=max(qlens), max_seq_len=max(lens), query_lens_cpu=qlens,
        seq_lens_cpu=lens)
    return cache.to(device), q.to(device), k.to(device), v.to(device), attn


CASES = {  # id: (dtype, [(context, query tokens)], block_size, kv heads, group, head_dim, window, launch)
    "b16-g4-chunks-and-decodes": (torch.float32, [(0, 37), (100, 20), (64, 1), (300, 1), (5, 16)], 16, 2, 4, 64, None,
                                  None),
    "b8-g1-bf16-fresh-beside-a-decode": (torch.bfloat16, [(0, 50), (20, 1), (0, 17)], 8, 2, 1, 32, None, None),
    "b16-g3-d24-window": (torch.float32, [(90, 30), (0, 45), (200, 1)], 16, 2, 3, 24, 40, None),
    "b8-g8-small-tiles": (torch.float32, [(33, 21), (7, 9)], 8, 1, 8, 16, None, "4,16,2,1"),
    # 4 tokens x 1 head: rows padded to the 16 a tensor-core product takes
    "b16-g1-tiny-tiles": (torch.float32, [(20, 9), (0, 5), (30, 1)], 16, 2, 1, 16, None, "4,16,0,1"),
    "b16-g4-bf16-window-beyond-chunk": (torch.bfloat16, [(250, 70), (10, 3)], 16, 2, 4, 64, 64, "16,32,0,2"),
}


def _attend(cache: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: AttentionMetadata,
            window: int | None, choice: str, monkeypatch: pytest.MonkeyPatch) -> tuple[torch.Tensor, bool]:
    """Layer 1's attention of the step with PDLAUNCH_PAGED_PREFILL=choice -> (output, whether the kernel ran)."""
    monkeypatch.setenv("PDLAUNCH_PAGED_PREFILL", choice)
    cache = cache.clone()
    plan = build_group_plan(attn, 0, cache, window)
    out = paged_attention(q, k, v, cache, 1, plan, q.shape[-1] ** -0.5)
    assert isinstance(out, torch.Tensor)
    return out, plan.prefill_tiles is not None


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_the_torch_path(device: str, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    dtype, seqs, block_size, hkv, group, head_dim, window, launch = CASES[case]
    if launch is not None:
        monkeypatch.setenv("PDLAUNCH_PREFILL_LAUNCH", launch)
    cache, q, k, v, attn = _step(device, dtype, seqs, block_size, hkv, group, head_dim, window)
    want, used = _attend(cache, q, k, v, attn, window, "torch", monkeypatch)
    assert not used
    got, used = _attend(cache, q, k, v, attn, window, "auto" if device == "cuda" else "triton", monkeypatch)
    assert used, "the plan must take the kernel"
    assert not got.isnan().any(), "read a poisoned (released, padded or unwritten) block"
    err = ((got.double() - want.double()).norm() / want.double().norm()).item()
    # bf16: probabilities enter the value product in bf16 (FlashAttention), the output is bf16.
    assert err < (1e-2 if dtype == torch.bfloat16 else 1e-5), err


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 48])
def test_fp8_cache_matches_the_torch_path(window: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """An fp8 cache with k and v scales: keys and values read as the torch path reads them (scaled up)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cache, q, k, v, attn = _step("cuda", torch.bfloat16, [(130, 40), (0, 33), (77, 1)], 16, 2, 4, 128, window)
    cache = cache.nan_to_num(0.0).to(torch.float8_e4m3fn)
    outs = []
    for choice in ("torch", "auto"):
        monkeypatch.setenv("PDLAUNCH_PAGED_PREFILL", choice)
        c = cache.clone()
        plan = build_group_plan(attn, 0, c, window)
        assert (plan.prefill_tiles is not None) == (choice == "auto")
        outs.append(paged_attention(q, k, v, c, 1, plan, 128**-0.5, kv_scales=(0.5, 2.0)))
    want, got = outs
    assert isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor)
    err = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert err < 1e-2, err


def test_interpreter_cases_in_a_subprocess() -> None:
    run_interpreter_child(__file__, "interpret", f"{len(CASES) + 2} passed")


def test_large_prompt_steps_keep_the_torch_path(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above PAGED_PREFILL_MAX_TOKENS prompt tokens a step keeps SDPA, whose products are faster there."""
    monkeypatch.setenv("PDLAUNCH_PAGED_PREFILL", "auto" if device == "cuda" else "triton")
    cache, _, _, _, attn = _step(device, torch.float32, [(16, PAGED_PREFILL_MAX_TOKENS + 1)], 16, 1, 1, 16, None)
    assert build_group_plan(attn, 0, cache, None).prefill_tiles is None
    cache, _, _, _, attn = _step(device, torch.float32, [(16, PAGED_PREFILL_MAX_TOKENS)], 16, 1, 1, 16, None)
    assert build_group_plan(attn, 0, cache, None).prefill_tiles is not None


def test_fresh_prompts_alone_keep_the_torch_path(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step of fresh prompts only has no keys to gather and no decode waiting on its host work: SDPA. The same
    prompts beside a decode, or a chunk over cached keys, take the kernel."""
    monkeypatch.setenv("PDLAUNCH_PAGED_PREFILL", "auto" if device == "cuda" else "triton")
    for seqs, used in (([(0, 40), (0, 3)], False), ([(0, 40), (9, 1)], True), ([(5, 40)], True)):
        cache, _, _, _, attn = _step(device, torch.float32, seqs, 16, 1, 1, 16, None)
        assert (build_group_plan(attn, 0, cache, None).prefill_tiles is not None) == used, seqs


def test_a_launch_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDLAUNCH_PREFILL_LAUNCH", "32,64,8,3")
    launch = prefill_launch()
    assert (launch.block_q, launch.block_n, launch.num_warps, launch.num_stages) == (32, 64, 8, 3)
    monkeypatch.setenv("PDLAUNCH_PREFILL_LAUNCH", "16,64,0,2")
    assert prefill_launch().warps(4) == 4 and prefill_launch().warps(8) == 8


def test_tiles_cover_every_chunk_token_once() -> None:
    tiles = prefill_tiles([0, 37, 57], [37, 20, 16], [0, 100, 5], [0, 1, 4], 16)
    assert tiles == [(0, 16, 0, 0), (16, 16, 16, 0), (32, 5, 32, 0), (37, 16, 100, 1), (53, 4, 116, 1),
                     (57, 16, 5, 4)]


def test_the_torch_path_on_cpu_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: CUDA only, so CPU instances (and the CPU test suite) keep the torch path."""
    monkeypatch.delenv("PDLAUNCH_PAGED_PREFILL", raising=False)
    cache, _, _, _, attn = _step("cpu", torch.float32, [(5, 7)], 16, 1, 2, 16, None)
    assert build_group_plan(attn, 0, cache, None).prefill_tiles is None


@pytest.mark.parametrize("setting", ["16", "16,64", "16,64,4", "16,48,4,2", "16,8,4,2", "a,64,4,2", "16,64,3,2",
                                     "16,64,4,0", "16,64,4,2,1"])
def test_a_bad_launch_is_refused_naming_the_variable(setting: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDLAUNCH_PREFILL_LAUNCH", setting)
    with pytest.raises(PdlaunchError) as raised:
        prefill_launch()
    assert raised.value.field == "PDLAUNCH_PREFILL_LAUNCH" and setting in str(raised.value)


def test_a_bad_choice_is_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernel could run (CUDA, or the interpreter as here): a GPU instance's start-up warm-up meets it."""
    pytest.importorskip("triton")
    monkeypatch.setenv("PDLAUNCH_PAGED_PREFILL", "fast")
    cache = torch.zeros(1, 1, 2, 16, 1, 16)
    assert not triton_prefill.paged_prefill_available(cache), "a CPU instance ignores it"
    monkeypatch.setattr(triton_prefill, "interpret_mode", lambda: True)
    with pytest.raises(PdlaunchError) as raised:
        triton_prefill.paged_prefill_available(cache)
    assert raised.value.field == "PDLAUNCH_PAGED_PREFILL" and "fast" in str(raised.value)
