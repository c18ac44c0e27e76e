"""The weight-only FP8 kernel of decode (`block_fp8_gemv`, model/quant/block_gemv.py) without a GPU: on CPU
tensors under TRITON_INTERPRET=1 (a child pytest, as in tests/model/test_triton_moe.py) against float32 on
the dequantized weight, at row counts 1-4 (the linear layer takes it for 1), widths that are not a multiple
of the row tile (masked rows), K that is not a multiple of the column tile (masked scale blocks), and the
shipped configuration and the per-shape ones (GEMV_SHAPE_CONFIGS); each case with the scales folded into x
(`fold`) and not."""

from __future__ import annotations

import pytest
import torch

from pdlaunch.model.quant import fp8
from tests.model.interpreter import INTERPRET_AT_START, run_interpreter_child


@pytest.fixture
def interpret() -> None:
    pytest.importorskip("triton")
    if not INTERPRET_AT_START:
        pytest.skip("runs in the child of test_interpreter_cases_in_a_subprocess")


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("m,n,k,config", [
    (1, 256, 384, (8, 256, 4)),     # K = 3 scale blocks: the last tile's second block is masked
    (3, 200, 512, (16, 512, 4)),    # N not a multiple of 16: masked rows; rows of a 72-row last block
    (4, 136, 1024, (8, 512, 4)),
    (2, 128, 128, None),            # the tuned choice
    # the tuned choice, K of 17 scale blocks (a masked tail of the 1024 tile); over 4096 rows, where gemv_fold
    # (the linear layer's choice) does not fold (9000 rows before: the same path, 1125 programs, 2.2x the time)
    (1, 4104, 2176, None),
    (1, 40, 2304, (4, 2048, 4)),    # GEMV_SHAPE_CONFIGS' launches: 2048-column tiles, the second one masked
    (1, 48, 2048, (8, 2048, 4)),    # one tile covers K
    (1, 72, 3072, (16, 1024, 8)),   # 16 rows a program, 72 rows: the last program's rows masked
    (1, 36, 2048, (4, 1024, 4)),    # the H100's 30B-A3B qkv launch
    (1, 24, 4096, (8, 2048, 8)),    # the H100's 30B-A3B o launch: two full 2048-column tiles
])
def test_interpret_gemv_equals_float32_on_the_dequantized_weight(
        interpret: None, m: int, n: int, k: int, config: tuple[int, int, int] | None, fold: bool) -> None:
    from pdlaunch.model.quant.block_gemv import GEMV_MAX_ROWS, block_fp8_gemv
    from pdlaunch.model.quant.gemm import block_fp8_linear

    gen = torch.Generator().manual_seed(m * n + k)
    q, s = fp8.quantize_block(0.02 * torch.randn(n, k, generator=gen))
    x = torch.randn(m, k, generator=gen).bfloat16()
    want = x.float() @ fp8.dequantize(q, s, 128).t()
    got = block_fp8_gemv(x, q, s, torch.float32, config, fold)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if config is None and m <= GEMV_MAX_ROWS and not fold:  # what the linear layer calls for one row
        torch.testing.assert_close(block_fp8_linear(x, q, s, torch.float32), want, rtol=1e-5, atol=1e-5)


def test_interpreter_cases_in_a_subprocess() -> None:
    run_interpreter_child(__file__, "interpret_", "20 passed")


def test_fold_choice_follows_the_measured_shapes() -> None:
    """The GEMV folds the scales into x for the shapes where that measured faster: Llama-3-8B's o and down
    (4096 rows), Qwen3-30B-A3B's o (2048), Llama-3-70B's down (8192 rows, 28672 columns); not for Llama-3-8B's
    q/k/v (6144 x 4096) and gate_up (28672), Qwen3-30B-A3B's q/k/v (5120 x 2048), Llama-3-70B's q/k/v
    (10240 x 8192)."""
    from pdlaunch.model.quant.block_gemv import gemv_fold

    assert all(gemv_fold(n, k) for n, k in [(4096, 4096), (4096, 14336), (2048, 4096), (8192, 28672), (8192, 8192)])
    assert not any(gemv_fold(n, k) for n, k in [(6144, 4096), (28672, 4096), (5120, 2048), (10240, 8192),
                                                (57344, 8192), (8192, 4096)])


def test_launch_per_shape_on_the_h200_and_the_rule_elsewhere() -> None:
    """gemv_launch: the H200's measured launches for the Llama-3-8B and Qwen3-30B-A3B projections, the H100's for
    Qwen3-30B-A3B's; any other weight, and every weight on another device, GEMV_CONFIG with gemv_fold's choice."""
    from pdlaunch.model.quant.block_gemv import GEMV_CONFIG, gemv_fold, gemv_launch

    assert gemv_launch("NVIDIA H200", 4096, 14336) == ((4, 2048, 4), False)
    assert gemv_launch("NVIDIA H200", 2048, 4096) == ((4, 2048, 4), True)
    assert gemv_launch("NVIDIA H200", 6144, 4096) == ((16, 1024, 8), False)
    assert gemv_launch("NVIDIA H100 80GB HBM3", 2048, 4096) == ((8, 2048, 8), True)
    for name, n, k in [("NVIDIA H200", 4096, 7168), ("NVIDIA H100 80GB HBM3", 4096, 14336), ("", 2048, 4096)]:
        assert gemv_launch(name, n, k) == (GEMV_CONFIG, gemv_fold(n, k))


def test_split_ranges_follow_the_rows_and_the_weight() -> None:
    """split_config on 132 SMs: up to 32 rows, K in ranges of at least 8 blocks within 4 programs a SM where that
    makes 4 ranges or more (Llama-3-8B qkv and o 4, down 8; Qwen3-30B-A3B o 4); Qwen3-30B-A3B qkv (16 blocks) and
    gate_up-sized weights (448 tiles) keep the one-per-SM rule, as does every weight from 33 rows but those of a
    long K, which take 32-row tiles in ranges of at least 8 blocks within 4 programs a SM (benchmarks/
    fp8_small_m_rotated.py timings in the constants' comment)."""
    from pdlaunch.model.quant.split_gemm import split_config

    def ranges(n: int, k: int, rows: int) -> int:
        return split_config(n, k, 132, rows)[1]

    for rows in (2, 16, 32):
        assert [ranges(6144, 4096, rows), ranges(4096, 4096, rows), ranges(4096, 14336, rows)] == [4, 4, 8]
        assert [ranges(2048, 4096, rows), ranges(5120, 2048, rows), ranges(28672, 4096, rows)] == [4, 1, 1]
    for rows in (33, 64):
        assert [ranges(6144, 4096, rows), ranges(4096, 4096, rows)] == [1, 2]
        assert [ranges(2048, 4096, rows), ranges(5120, 2048, rows)] == [4, 1]
        # a long K (down_proj, 112 blocks): 32-row tiles in 4 ranges of 28 blocks, 512 programs
        assert split_config(4096, 14336, 132, rows) == (32, 4, 4, 4)
        assert split_config(4096, 7168, 132, rows) == (64, 2, 4, 4)  # its TP-2 shard (56 blocks): the old rule
    assert split_config(4096, 14336, 132) == split_config(4096, 14336, 132, 64)  # rows default: 64
