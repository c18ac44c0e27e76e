"""The runner's start-up warm-up (runner/dry_steps.py `_warm_up`, CUDA only at start): the step shapes it
runs cover every prompt size class and every paged-decode launch, and running them writes nothing."""

from __future__ import annotations

import pytest
import torch

from pdlaunch.config.engine_config import CacheConfig, SchedulerConfig
from pdlaunch.errors import EngineError
from pdlaunch.model.checkpoint import load_checkpoint
from pdlaunch.model.decode_launch import choose_launch, launch_batch_sizes
from pdlaunch.runner.model_runner import ModelRunner


@pytest.mark.parametrize("kv_heads,sms,elem", [(8, 132, 2), (4, 132, 2), (4, 132, 1), (1, 16, 2), (8, 78, 2)])
def test_launch_batch_sizes_give_every_launch_once(kv_heads: int, sms: int, elem: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import pdlaunch.model.decode_launch as td

    monkeypatch.setattr(td, "_num_sms", lambda index: sms)
    sizes = launch_batch_sizes(256, kv_heads, 128, torch.device("cuda", 0), element_size=elem)
    launches = [choose_launch(n, kv_heads, 128, sms, element_size=elem) for n in sizes]
    assert len(set(launches)) == len(sizes)  # one size per launch, no launch twice
    every = {choose_launch(n, kv_heads, 128, sms, element_size=elem) for n in range(1, 257)}
    assert set(launches) == every  # ... and none missing
    assert sizes[0] == 1


def _runner(role: str, budget: int, max_model_len: int = 64) -> ModelRunner:
    return ModelRunner(load_checkpoint("tiny"), torch.device("cpu"), torch.float32, CacheConfig(num_gpu_blocks=32),
                       SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8), max_model_len=max_model_len,
                       role=role)  # type: ignore[arg-type]


def test_warm_up_shapes_cover_prompt_sizes_and_decode_launches() -> None:
    runner = _runner("colocated", 96)
    shapes = runner.warm_up_shapes()
    prompts = [q for q, c in shapes if not any(c)]
    assert [sum(q) for q in prompts] == [1, 2, 4, 8, 16, 32, 64, 96]  # powers of two up to the budget
    assert prompts[-1] == [64, 32]  # no prompt longer than max_model_len
    assert ([16], [16]) in shapes  # a chunk over cached context
    decode_sizes = launch_batch_sizes(8, runner.num_kv_heads, runner.head_dim, runner.device)
    assert [len(q) for q, c in shapes if q[0] == 1 and c[0] == 1] == decode_sizes  # decode alone
    mixed = [(q, c) for q, c in shapes if len(q) > 1 and q[0] == 16]
    assert [len(q) - 1 for q, _ in mixed] == decode_sizes and all(c[0] == 16 for _, c in mixed)
    # a prefill instance never decodes: prompts and a chunk only
    assert all(q == [16] or not any(c) for q, c in _runner("prefill", 96).warm_up_shapes())


def test_warm_up_runs_a_chunk_over_cached_tokens_on_the_torch_path_where_the_budget_allows() -> None:
    """A prompt step over a cached prefix with more tokens than the paged prefill kernel takes runs SDPA with
    torch's causal_lower_right mask, whose first use imports torch._dynamo: a 2 s stall mid-serving on an H200 when
    no warm-up step had taken that path."""
    from pdlaunch.model.triton_prefill import PAGED_PREFILL_MAX_TOKENS

    for role in ("prefill", "decode", "colocated"):
        shapes = _runner(role, 2048, max_model_len=4096).warm_up_shapes()
        assert ([2048], [1]) in shapes
        assert 2048 > PAGED_PREFILL_MAX_TOKENS
        # A one-block prefix of a block size under 16 leaves a 513-519-token chunk over it at max_model_len 520
        shapes = _runner(role, 2048, max_model_len=520).warm_up_shapes()
        assert ([519], [1]) in shapes
        # ... and at max_model_len 513 no chunk over a cached token can pass the kernel's 512 tokens
        shapes = _runner(role, 2048, max_model_len=PAGED_PREFILL_MAX_TOKENS + 1).warm_up_shapes()
        assert not any(c[0] and q[0] > PAGED_PREFILL_MAX_TOKENS for q, c in shapes)
    assert ([600], [1]) in _runner("prefill", 600, max_model_len=4096).warm_up_shapes()


def test_warm_up_runs_every_shape_and_writes_nothing_to_the_cache() -> None:
    runner = _runner("colocated", 96)
    calls: list[int] = []
    real = runner.model.forward

    def forward(ids: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(ids.shape[0])
        return real(ids, *args)

    runner.model.forward = forward  # type: ignore[method-assign]
    runner._warm_up()
    assert calls == [sum(q) for q, _ in runner.warm_up_shapes()]
    assert all(int(cache.count_nonzero()) == 0 for cache in runner.kv_caches)


def test_kernels_compile_one_variant_for_every_batch() -> None:
    """Arguments that follow the batch (token and row counts, an eager step's block-table width) are not
    specialized on: Triton would otherwise compile a second variant of a kernel the first time a count is
    not a multiple of 16 (or is 1), in the middle of serving, where warm-up cannot reach every count."""
    pytest.importorskip("triton")
    from pdlaunch.model.decode_gemm_kernels import kernels_for as decode_gemm_kernels
    from pdlaunch.model.moe.align_kernels import _kernels as moe_align_kernels
    from pdlaunch.model.moe.gemm_kernels import gemm_kernels as moe_gemm_kernels
    from pdlaunch.model.paged_decode_kernel import kernel_for as decode_kernels
    from pdlaunch.model.quant.block_gemv import _kernels as quant_gemv_kernels
    from pdlaunch.model.quant.gemm import _kernels as quant_gemm_kernels
    from pdlaunch.model.swiglu import _kernels as swiglu_kernels
    from pdlaunch.runner.stage_inputs import _kernels as stage_kernels

    def unspecialized(kernel: object) -> set[str]:
        return {p.name for p in kernel.params if p.do_not_specialize}  # type: ignore[attr-defined]

    moe, align = moe_gemm_kernels(False), moe_align_kernels(False)
    # (and the attention output's scale strides: with cuBLAS's column-major scales one of them is the row count)
    assert unspecialized(decode_kernels(False)) == {"stride_bt", "stride_st", "stride_sh"}
    assert unspecialized(moe.up) == unspecialized(moe.down) == {"num_rows"}
    assert unspecialized(align.align_count) == unspecialized(align.align_place) == {"num_rows", "num_blocks"}
    assert unspecialized(quant_gemm_kernels().block_gemm) == unspecialized(quant_gemv_kernels().block_gemv) == {"M"}
    assert unspecialized(decode_gemm_kernels(False).gemm) == unspecialized(swiglu_kernels(False).gemm) == {"M"}
    # a replayed step's staged inputs: every count and offset (the batch, its rows, its tables' width)
    assert unspecialized(stage_kernels(False).stage) == {"packed_stride", "batch", "packed_count", "ids_row",
                                                          "pend_row", "table_stride", "table_offset", "width",
                                                          "table_count"}


def test_no_warm_up_step_is_longer_than_max_model_len() -> None:
    for max_model_len in (8, 17, 64):
        shapes = _runner("colocated", 96, max_model_len).warm_up_shapes()
        assert all(q + c <= max_model_len for lens, ctx in shapes for q, c in zip(lens, ctx))


def test_a_warm_up_step_out_of_memory_names_the_budget() -> None:
    runner = _runner("colocated", 96)

    def forward(ids: torch.Tensor, *args: object) -> torch.Tensor:
        if ids.shape[0] == 96:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return torch.zeros(ids.shape[0], 8)

    runner.model.forward = forward  # type: ignore[method-assign]
    runner.model.compute_logits = lambda hidden: hidden  # type: ignore[method-assign]
    with pytest.raises(EngineError) as caught:
        runner._warm_up()
    assert caught.value.field == "scheduler.max_num_batched_tokens"
    assert "a step of 96 tokens (2 sequences) ran out of GPU memory" in str(caught.value)
    assert "Tried to allocate 2.00 GiB" in str(caught.value) and "more detail" not in str(caught.value)


@pytest.mark.parametrize("max_model_len,budget,longest", [(64, 96, 64), (300, 96, 96), (300, 1000, 300)])
def test_fresh_attention_warm_up_is_skipped_on_cpu_and_covers_one_step(max_model_len: int, budget: int, longest: int,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU runs no fresh prompt padded (model/fresh_attention.py), so its start-up builds no bucket; on CUDA the
    buckets reach the longest fresh prompt of one step (its bucket may pass max_model_len by < 256 tokens)."""
    import pdlaunch.runner.dry_steps as dry_steps

    runner = _runner("colocated", budget, max_model_len)
    asked: list[int] = []
    monkeypatch.setattr(dry_steps, "warm_fresh_attention", lambda *args: asked.append(args[-1]) or 0)
    assert runner._warm_fresh_attention() == 0 and asked == []
    runner.device = torch.device("cuda", 0)  # only its type is read before the (recorded) warm-up
    runner._warm_fresh_attention()
    assert asked == [longest]
