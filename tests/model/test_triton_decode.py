"""Paged decode kernel == the torch gather path of model/attention.py, on any shape the engine makes.

Kernel cases run on "cuda" (gpu marker) and on CPU tensors under TRITON_INTERPRET=1 ("interpret",
in a child pytest started with the variable set, as in test_fused_ops.py). Each case: random
caches and queries, scrambled block ids, released (out-of-window) and unused blocks filled with
NaN so that any read of them poisons the output, several sequences of different lengths; block
sizes 4..128, GQA groups 1, 3, 4, 5 and 8 (padded to 16 rows), a non-power-of-2 head_dim, sliding
windows, tiles smaller and larger than a block, and context splits with and without merging (one load
of every partial, or several).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pdlaunch.errors import PdlaunchError
from pdlaunch.model import decode_launch, split_counters, triton_decode, triton_env
from pdlaunch.model.attention import paged_attention
from pdlaunch.model.attention_metadata import AttentionMetadata
from pdlaunch.model.attention_plan import build_group_plan
from pdlaunch.model.decode_launch import DecodeLaunch, choose_launch
from pdlaunch.model.triton_decode import paged_decode
from tests.model.interpreter import INTERPRET_AT_START, run_interpreter_child

POISON = 0  # block id of padded table entries and released blocks: filled with NaN


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.gpu), "interpret"])
def device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    pytest.importorskip("triton")
    if request.param == "interpret" and not INTERPRET_AT_START:
        pytest.skip("runs in the child of test_interpreter_cases_in_a_subprocess")
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setenv("PDLAUNCH_PAGED_DECODE", "torch")  # the reference plan: the gather path
    return request.param if request.param == "cuda" else "cpu"


def _case(device: str, dtype: torch.dtype, seq_lens: list[int], block_size: int, num_kv_heads: int, group: int,
          head_dim: int, window: int | None, layers: int = 2, seed: int = 0
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """(q [S, Hq, D], new k and v [S, Hkv, D], decode metadata) over a fresh poisoned cache."""
    gen = torch.Generator().manual_seed(seed)
    tables: list[list[int]] = []
    free = torch.randperm(4096, generator=gen).tolist()
    free.remove(POISON)
    for n in seq_lens:
        blocks = [free.pop() for _ in range(-(-n // block_size))]
        if window is not None:  # blocks wholly before the window were released (engine: -1 -> 0)
            first = max(0, n - window)
            blocks = [POISON if (i + 1) * block_size <= first else b for i, b in enumerate(blocks)]
        tables.append(blocks)
    width = max(len(t) for t in tables) + 2  # padding past every sequence's blocks, as in batches
    table = torch.tensor([t + [POISON] * (width - len(t)) for t in tables])
    used = sorted({b for t in tables for b in t} | {POISON})
    num_blocks = max(used) + 1
    shape = (num_blocks, layers, 2, block_size, num_kv_heads, head_dim)
    cache = torch.full(shape, float("nan"), dtype=dtype)
    live = torch.tensor([b for b in used if b != POISON])
    cache[live] = torch.randn((len(live), *shape[1:]), generator=gen).to(dtype)
    hq = num_kv_heads * group
    s = len(seq_lens)
    q = torch.randn(s, hq, head_dim, generator=gen).to(dtype)
    k = torch.randn(s, num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(s, num_kv_heads, head_dim, generator=gen).to(dtype)
    lens = torch.tensor(seq_lens)
    slots = torch.tensor([tables[i][(n - 1) // block_size] * block_size + (n - 1) % block_size
                          for i, n in enumerate(seq_lens)])
    attn = AttentionMetadata(
        query_start_loc=torch.arange(s + 1).to(device), seq_lens=lens.to(device), context_lens=(lens - 1).to(device),
        slot_mapping=[slots.to(device)], block_tables=[table.to(device)], max_query_len=1,
        max_seq_len=max(seq_lens), query_lens_cpu=[1] * s, seq_lens_cpu=list(seq_lens))
    return cache.to(device), q.to(device), torch.stack([k, v]).to(device), attn


def _check(device: str, dtype: torch.dtype, seq_lens: list[int], block_size: int, num_kv_heads: int, group: int,
           head_dim: int, window: int | None, launch: DecodeLaunch | None, layer: int = 1) -> None:
    cache, q, kv, attn = _case(device, dtype, seq_lens, block_size, num_kv_heads, group, head_dim, window)
    scale = head_dim**-0.5
    plan = build_group_plan(attn, 0, cache, window)
    assert plan.decode_rows is not None, "the reference must be the torch gather path"
    want = paged_attention(q, kv[0], kv[1], cache, layer, plan, scale)  # writes the new k/v, then attends
    tokens = torch.arange(len(seq_lens), device=cache.device)
    got = paged_decode(q, cache, layer, tokens, attn.block_tables[0], attn.seq_lens, window, scale, launch)
    assert got.shape == want.shape and got.dtype == q.dtype
    assert not got.isnan().any(), "read a poisoned (released, padded or unwritten) block"
    assert not split_counters.leftover(cache.device), "the merging range must leave its split counter at zero"
    err = ((got.double() - want.double()).norm() / want.double().norm()).item()
    # bf16: probabilities enter the value product in bf16 (FlashAttention), the output is bf16.
    assert err < (1e-2 if dtype == torch.bfloat16 else 1e-5), err


CASES = {  # id: (dtype, seq_lens, block_size, kv heads, group, head_dim, window, launch)
    "b16-g4-default": (torch.float32, [1, 37, 300], 16, 2, 4, 64, None, None),
    "b8-g1-window-splits": (torch.bfloat16, [9, 150, 200], 8, 2, 1, 16, 20, DecodeLaunch(16, 4, 1, 4, 2)),
    "b128-g3-d24-tile-inside-block": (torch.float32, [130, 257, 3], 128, 2, 3, 24, None, DecodeLaunch(64, 2, 1, 4, 2)),
    "b32-g8-window-8-splits": (torch.float32, [5, 120, 260], 32, 1, 8, 32, 37, DecodeLaunch(32, 8, 1, 4, 2)),
    "b4-g5-bf16-one-range": (torch.bfloat16, [2, 66, 91], 4, 2, 5, 16, None, DecodeLaunch(16, 1, 1, 4, 1)),
    "b64-g2-d128-window-splits": (torch.float32, [64, 65, 190], 64, 2, 2, 128, 100, DecodeLaunch(64, 4, 1, 4, 2)),
    "b8-g4-empty-splits": (torch.float32, [3, 40], 8, 2, 4, 16, None, DecodeLaunch(16, 8, 2, 4, 2)),
    # contexts of up to 4 tiles in one-tile ranges (40 tokens: 3), longer ones in ranges of 4 tiles (100: 2)
    "b8-g2-short-context-ranges": (torch.float32, [40, 100, 5], 8, 2, 2, 16, None, DecodeLaunch(16, 8, 4, 4, 2, 4)),
    # 63 active ranges of 8 heads x 128: the merging program takes them 8 at a time (MERGE_ELEMENTS)
    "b16-g8-d128-chunked-merge": (torch.float32, [3000, 40], 16, 1, 8, 128, None, DecodeLaunch(16, 64, 3, 4, 2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_the_torch_gather_path(device: str, case: str) -> None:
    dtype, seq_lens, block_size, hkv, group, head_dim, window, launch = CASES[case]
    _check(device, dtype, seq_lens, block_size, hkv, group, head_dim, window, launch)


LEAD_CASES = {  # id: (dtype, prompts [(length, rows)], decodes [length], block_size, kv heads, group, head_dim,
    #                window, launch); the rows per program follow the group (rows_per_program): 4, 2, 5, 4
    "b16-g4-bf16-two-prompts": (torch.bfloat16, [(300, 9), (70, 5)], [1, 129], 16, 2, 4, 64, None, None),
    # rows whose windows start in different ranges: a range none of a row's keys are in, merged
    "b8-g8-window-splits": (torch.float32, [(200, 7)], [50], 8, 1, 8, 32, 37, DecodeLaunch(16, 8, 1, 4, 2)),
    "b8-g3-short-ranges": (torch.float32, [(100, 6)], [40], 8, 2, 3, 16, None, DecodeLaunch(16, 8, 4, 4, 2, 4)),
    # a program's 4 rows x 4 heads of 128 merge 4 of their 16 ranges a load (MERGE_ELEMENTS)
    "b16-g4-d128-chunked-merge": (torch.float32, [(1000, 5)], [40], 16, 1, 4, 128, None,
                                  DecodeLaunch(16, 16, 1, 4, 2)),
}


@pytest.mark.parametrize("case", list(LEAD_CASES))
def test_prompt_rows_with_leads_equal_each_row_alone(device: str, case: str) -> None:
    """A prompt's tokens as rows (one per token, the sequence's block table repeated, lengths p + 1): computed in
    programs of rows_per_program rows that load each K/V tile once (`leads`), beside decodes that lead
    themselves, they equal the same rows each computed alone."""
    dtype, prompts, decodes, block_size, hkv, group, head_dim, window, launch = LEAD_CASES[case]
    lengths = [n for n, _ in prompts] + decodes
    # Blocks out of the window stay (None): a prompt's first row still sees keys its last row's window left.
    cache, _, _, attn = _case(device, dtype, lengths, block_size, hkv, group, head_dim, None)
    table, per_row = attn.block_tables[0], decode_launch.rows_per_program(hkv * group, hkv)
    tables, lens, leads = [], [], []
    order = [("decode", len(prompts))] + [("prompt", i) for i in range(len(prompts))] + \
        [("decode", len(prompts) + j) for j in range(1, len(decodes))]
    for kind, i in order:
        if kind == "decode":
            tables.append(table[i]), lens.append(lengths[i]), leads.append(len(leads))
            continue
        n, q = prompts[i]
        start = len(leads)
        for j in range(q):
            tables.append(table[i]), lens.append(n - q + 1 + j), leads.append(start + j // per_row * per_row)
    rows = len(leads)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(rows, hkv * group, head_dim, generator=gen).to(dtype).to(cache.device)
    tokens = torch.arange(rows, device=cache.device)
    args = (q, cache, 1, tokens, torch.stack(tables), torch.tensor(lens, device=cache.device), window, head_dim**-0.5,
            launch)
    grouped = paged_decode(*args, leads=torch.tensor(leads, device=cache.device))
    alone = paged_decode(*args)
    assert any(lead != r for r, lead in enumerate(leads)), "some program must compute several rows"
    assert not grouped.isnan().any(), "a row read a poisoned block, or a softmax of no key"
    assert not split_counters.leftover(cache.device), "the merging range must leave its split counter at zero"
    err = ((grouped.double() - alone.double()).norm() / alone.double().norm()).item()
    assert err < (1e-2 if dtype == torch.bfloat16 else 1e-5), err


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("window", [None, 1000])
def test_cuda_8b_head_shapes_at_long_context(device: str, block_size: int, window: int | None) -> None:
    """Llama-3-8B heads (8 KV heads, group 4, head_dim 128, bf16) with the launch the engine picks."""
    if device != "cuda":
        pytest.skip("CUDA sizes")
    _check(device, torch.bfloat16, [1, 700, 4100, 8000, 2049], block_size, 8, 4, 128, window, None)


@pytest.mark.gpu
def test_cuda_graph_replays_for_new_contexts_and_windows(device: str) -> None:
    """Captured at short contexts (one range each), replayed at long ones (several ranges merged)
    after the block tables and lengths changed in place: equals an eager call."""
    if device != "cuda":
        pytest.skip("CUDA graphs")
    cache, long_q, _, long_attn = _case(device, torch.bfloat16, [5000, 1, 2500], 16, 8, 4, 128, None, layers=1)
    q = torch.zeros_like(long_q)
    table = torch.zeros_like(long_attn.block_tables[0])
    lens = torch.empty(3, dtype=torch.long, device=device)
    tokens = torch.arange(3, device=device)
    for window in (None, 700):
        q.zero_()
        table.zero_()
        lens.copy_(torch.tensor([3, 40, 17]))
        args = (q, cache, 0, tokens, table, lens, window, 0.1)
        paged_decode(*args)  # compiles outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = paged_decode(*args)
        q.copy_(long_q)
        table.copy_(long_attn.block_tables[0])
        lens.copy_(long_attn.seq_lens)
        graph.replay()
        torch.testing.assert_close(out, paged_decode(*args), atol=0, rtol=0)
        assert not out.isnan().any()


def test_cpu_mode_reads_the_variable_on_a_triton_without_knobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton before 3.4 (torch 2.4-2.7) has no `triton.knobs`: the interpreter is TRITON_INTERPRET=1 alone, and
    every CUDA launch asks which mode it is in, so the question must not raise there."""
    import sys
    import types

    old_triton = types.ModuleType("triton")
    monkeypatch.setitem(sys.modules, "triton", old_triton)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_env.interpret_mode()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_env.interpret_mode()
    # Triton 3.4 and newer: its knobs answer (they also follow a value set in the program)
    old_triton.knobs = types.SimpleNamespace(runtime=types.SimpleNamespace(interpret=False))  # type: ignore[attr-defined]
    assert not triton_env.interpret_mode()


def test_launch_depends_on_batch_and_heads_only() -> None:
    one = choose_launch(1, 8, 128, num_sms=132)
    assert one.splits == 64 and one.tile * one.min_tiles >= 256  # 8 programs: split the context
    assert one.tile * one.short_tiles == decode_launch.SHORT_SPLIT_CONTEXT  # shorter: one-tile ranges
    many = choose_launch(128, 8, 128, num_sms=132)
    assert many.splits == 1 and many.tile == 64  # 1024 programs fill 132 SMs
    assert many.short_tiles == 0  # unsplit: nothing to shorten
    one_wave = choose_launch(64, 4, 128, num_sms=132)
    assert one_wave.splits == 1 and one_wave.tile == 128  # 256 programs: every SM once, longer tiles, unsplit
    assert one.tile == 128 and choose_launch(1, 8, 256, num_sms=132).tile == 64  # registers in bounds
    # an fp8 cache: twice the tokens per tile (the same bytes per loop iteration), at most 128 x 128 ...
    assert choose_launch(48, 8, 128, num_sms=132, element_size=1).tile == 128  # 384 programs: 1 wave of 396 slots
    assert choose_launch(80, 8, 128, num_sms=132, element_size=1).tile == 128  # 640: 1.6 waves, 1.2 of 64s
    assert choose_launch(1, 8, 128, num_sms=132, element_size=1).tile == 128
    # ... unless 64-token tiles (4 a SM against 3) fill the waves better: 512 programs, one wave of 528 slots
    assert choose_launch(64, 8, 128, num_sms=132, element_size=1).tile == 64
    assert choose_launch(128, 4, 128, num_sms=132, element_size=1).tile == 64
    assert choose_launch(128, 8, 128, num_sms=132, element_size=1).tile == 64  # 1024: 0.97 of 2 waves against 0.86
    assert choose_launch(128, 8, 256, num_sms=132, element_size=1).tile == 64


@pytest.mark.parametrize("cache,batch,rows", [("bf16", 48, 1), ("fp8e4nv", 48, 1), ("bf16", 1, 1), ("bf16", 96, 4)])
def test_kernel_compiles_for_h100_to_tensor_cores_and_pipelined_vector_loads(cache: str, batch: int, rows: int) -> None:
    """Compile (no GPU needed) at the Llama-8B shape, with the divisibility Triton's launcher
    specialises on (pointers and strides that are multiples of 16), and read the PTX: mma for the
    products, K/V tiles streamed by cp.async (software pipelining), no scalar global loads of cache
    elements (an fp8 cache at its 128-token tile). At batch 1 the context splits: the last range to finish
    counts itself in with a GPU-scope acq_rel atomic and reads the partials from L2 (.cg), past L1. With four
    rows a program (a prompt's tokens as rows, `leads`) the same holds."""
    pytest.importorskip("triton.backends.nvidia")
    if INTERPRET_AT_START:
        pytest.skip("the interpreter child decorates interpreted kernels")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pdlaunch.model.paged_decode_kernel import kernel_for

    kernel = kernel_for(False)
    types = {"q_ptr": "*bf16", "cache_ptr": f"*{cache}", "block_table_ptr": "*i64", "seq_lens_ptr": "*i64",
             "tokens_ptr": "*i64", "out_ptr": "*bf16", "part_ptr": "*fp32", "count_ptr": "*i32", "lead_ptr": "*i64",
             "s_ptr": "*fp32", "scale": "fp32"}
    launch = choose_launch(batch, 8, 128, num_sms=132, element_size=1 if cache == "fp8e4nv" else 2)
    constexprs = {"NUM_KV_HEADS": 8, "GROUP": 4, "GROUP_PAD": 16, "ROWS": rows, "BLOCK_SIZE": 16, "HEAD_DIM": 128,
                  "HEAD_PAD": 128,
                  "TILE": launch.tile, "SPLITS": launch.splits, "MIN_TILES": launch.min_tiles,
                  "SHORT_TILES": launch.short_tiles, "PRECISION": "tf32",
                  "DOT_FP32": False, "GROUP_P2": 4 * rows,
                  "SPLIT_CHUNK": min(launch.splits, triton_decode.MERGE_ELEMENTS // (4 * rows * 128)),
                  "V_F16": cache == "fp8e4nv", "QK_F16": cache == "fp8e4nv", "PDL": batch == 1, "PRELOAD": batch == 1,
                  "EARLY": batch == 1, "STORE": kernel.store_heads, "QUANT": False, "FMAX": 448.0, "INV_FMAX": 1 / 448}
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in kernel.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
               if n.endswith("_ptr") or n.startswith("stride") or n in ("block_stride", "k_offset", "v_offset")}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
    ptx = compiled.asm["ptx"]
    # One row a program (a decode): its length and token load as scalars. Loaded as 16-element vectors and
    # reduced, as a program of prompt rows loads them, the 8B shape's step over an fp8 cache at 48 x 3072 ran
    # its attention at 165 instead of 110 us a layer (one H200; RESULTS.md, thirty-fourth session).
    assert ("tensor<16x!tt.ptr<i64>>" in compiled.asm["ttir"]) == (rows > 1)
    assert "mma.sync" in ptx and "cp.async" in ptx and "ld.global.b16" not in ptx and "ld.global.b8" not in ptx
    # fp8: the value product in float16, the V tile transposed as 16-bit values (ldmatrix.trans), never
    # read from shared memory a byte at a time
    assert "ld.shared.b8" not in ptx and "ld.shared.u8" not in ptx
    assert ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in ptx) == (cache == "fp8e4nv")
    # fp8: the key product in float16 too (QK_F16), so no bf16 product at all
    assert ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in ptx) == (cache != "fp8e4nv")
    assert launch.splits == (1 if batch > 1 else 64)
    assert ("atom.global.gpu.acq_rel.add" in ptx and "ld.global.cg" in ptx) == (launch.splits > 1)
    # Batch 1 launches dependent on the kernel before (pdl_enabled): the sequence length and the first tile's
    # block ids load before the wait for it, and (attention_early) the next kernel may start right after it,
    # before any product.
    assert ("griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx) == (batch == 1)
    if batch == 1:
        assert "ld.global" in ptx[:ptx.index("griddepcontrol.wait")]
        assert ptx.index("griddepcontrol.wait") < ptx.index("griddepcontrol.launch_dependents") < ptx.index("mma.sync")
        # only those: no K/V tile (vector loads) before the wait, whose newest row the kernel before writes
        assert "ld.global.v4" not in ptx[:ptx.index("griddepcontrol.wait")]


@pytest.mark.slow
def test_interpreter_cases_in_a_subprocess() -> None:
    run_interpreter_child(__file__, "interpret", f"{len(CASES) + len(LEAD_CASES)} passed")


def test_decode_launch_override_reaches_the_kernel_for_the_calls_it_covers(monkeypatch: pytest.MonkeyPatch) -> None:
    """PDLAUNCH_DECODE_LAUNCH (benchmarks time a launch inside whole steps): its fields replace choose_launch's in the
    kernel's launch for calls of at most max_seqs sequences; larger calls keep choose_launch's."""
    seen: list[tuple[tuple[int, int, int], int, int, int, int]] = []

    class Spy:
        store_heads = None

        def __getitem__(self, grid: tuple[int, int, int]) -> Any:
            def launch(*args: Any, **kwargs: Any) -> None:
                seen.append((grid, kwargs["TILE"], kwargs["SHORT_TILES"], kwargs["num_warps"], kwargs["num_stages"]))
            return launch

    monkeypatch.setattr(triton_decode, "kernel_for", lambda interpret: Spy())
    monkeypatch.setenv("PDLAUNCH_DECODE_LAUNCH", "tile=64:splits=16:short_tiles=0:num_warps=8:num_stages=3:max_seqs=1")
    for lens in ([300], [300, 40]):
        cache, q, _, attn = _case("cpu", torch.float32, lens, 16, 2, 4, 64, None)
        tokens = torch.arange(len(lens))
        paged_decode(q, cache, 1, tokens, attn.block_tables[0], attn.seq_lens, None, 0.125, None)
    default = choose_launch(2, 2, 64, num_sms=16)  # (a CPU tensor's launch takes 16 SMs)
    assert seen == [((1, 2, 16), 64, 0, 8, 3),
                    ((2, 2, default.splits), default.tile, default.short_tiles, default.num_warps, default.num_stages)]


@pytest.mark.parametrize("setting,words", [
    ("tile=48", "out of range"), ("splits=3", "out of range"), ("num_stages=0", "out of range"),
    ("tile=512", "16 to 256"), ("splits=128", "splits at most"), ("blocks=2", "not a launch field"),
    ("tile=big", "not a launch field"), ("short_tiles=-1", "not a launch field")])
def test_a_bad_decode_launch_override_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch, setting: str,
                                                           words: str) -> None:
    monkeypatch.setenv("PDLAUNCH_DECODE_LAUNCH", setting)
    with pytest.raises(PdlaunchError) as caught:
        decode_launch.with_override(choose_launch(1, 8, 128, num_sms=132), 1)
    assert caught.value.field == "PDLAUNCH_DECODE_LAUNCH"
    assert words in str(caught.value) and setting in str(caught.value)
