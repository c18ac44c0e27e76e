"""The decode batch's projection GEMM (model/decode_gemm.py) against F.linear.

Kernel cases run on CUDA (gpu marker) and on CPU under the Triton interpreter, in a child pytest started with
TRITON_INTERPRET=1 (tests/model/interpreter.py). The kernel sums in another order than cuBLAS, so a bf16 result may
land one unit in the last place apart; the bound is two such units of the output's largest value.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdlaunch.model import decode_gemm as decode_gemm_module
from pdlaunch.model import parallel_linear
from pdlaunch.model.decode_gemm import MAX_ROWS, config_for, decode_gemm, decode_gemm_available
from pdlaunch.model.split_counters import leftover
from tests.model.interpreter import run_interpreter_child
from tests.model.kernel_cases import close_to, kernel_device  # noqa: F401 (the `device` fixture)

# (rows, N, K): rows and columns that fill no tile, K past one loop iteration and not a multiple of BLOCK_K.
SHAPES = [(2, 48, 64), (3, 40, 96), (17, 72, 256), (64, 64, 160)]
# (BLOCK_N, BLOCK_K, SPLIT_K, warps, stages, SWAP, TMA): one range, and K split in two and four (the last range
# short), x W^T and W x^T, through pointers and through TMA descriptors
LAUNCHES = [(32, 32, 1, 4, 2, 0, 0), (16, 32, 2, 4, 3, 0, 0), (32, 32, 4, 4, 2, 1, 0), (64, 32, 1, 4, 3, 1, 0),
            (32, 32, 1, 4, 2, 0, 1), (16, 32, 2, 4, 3, 0, 1), (32, 32, 4, 4, 2, 1, 1), (64, 32, 1, 4, 3, 1, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize(("rows", "n", "k"), SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_the_kernel_equals_f_linear(device: str, dtype: torch.dtype, launch: tuple[int, ...], rows: int, n: int,
                                    k: int, bias: bool) -> None:
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("the interpreter's float16 tiles: bf16 and float32 cover the rounding")
    torch.manual_seed(rows * 1000 + k)
    x = torch.randn(rows, k, dtype=dtype, device=device)
    weight = torch.randn(n, k, dtype=dtype, device=device) * k ** -0.5
    b = torch.randn(n, dtype=dtype, device=device) if bias else None
    got = decode_gemm(x, weight, b, config=launch)  # type: ignore[arg-type]
    # float32 in float64: the reference is the exact product, rounded once
    want = F.linear(x.double(), weight.double(), None if b is None else b.double()).to(dtype)
    close_to(got, want)
    assert not leftover(torch.device(device)), "a split's counter was left non-zero"


def test_rows_apart_in_a_wider_buffer_are_read_where_they_are(device: str) -> None:
    """x as a view into a wider buffer (rows further apart than K), as a decode step's slices are."""
    torch.manual_seed(3)
    wide = torch.randn(5, 96, dtype=torch.float32, device=device)
    x = wide[:, :64]
    weight = torch.randn(40, 64, dtype=torch.float32, device=device) * 0.1
    close_to(decode_gemm(x, weight, config=LAUNCHES[1]), F.linear(x.double(), weight.double()).float())


def test_a_tma_launch_over_rows_tma_cannot_read_runs_the_pointer_kernel(device: str) -> None:
    """x starting 2 bytes past a 16-byte boundary, rows 130 bytes apart: TMA cannot describe it, so a TMA launch
    reads it through pointers and still equals F.linear."""
    torch.manual_seed(4)
    wide = torch.randn(5, 65, dtype=torch.bfloat16, device=device)
    x = wide[:, 1:]
    assert not decode_gemm_module.tma_aligned(x) and decode_gemm_module.tma_aligned(x.contiguous())
    weight = torch.randn(40, 64, dtype=torch.bfloat16, device=device) * 0.1
    close_to(decode_gemm(x, weight, config=LAUNCHES[5]), F.linear(x.double(), weight.double()).to(torch.bfloat16))


@pytest.mark.slow
def test_interpreter_cases_in_a_subprocess() -> None:
    run_interpreter_child(__file__, "interpret", timeout=420)


def test_a_call_past_the_rows_or_with_mismatched_columns_is_refused() -> None:
    with pytest.raises(ValueError, match=f"at most {MAX_ROWS} rows"):
        decode_gemm(torch.zeros(MAX_ROWS + 1, 64), torch.zeros(32, 64), config=LAUNCHES[0])
    with pytest.raises(ValueError, match="64 columns for a weight"):
        decode_gemm(torch.zeros(4, 64), torch.zeros(32, 48), config=LAUNCHES[0])
    with pytest.raises(ValueError, match="no launch"):
        decode_gemm(torch.zeros(4, 64), torch.zeros(32, 64))


def test_the_device_table_picks_the_first_entry_that_covers_rows_and_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    small, large, wide = (32, 64, 2, 4, 3, 0, 0), (64, 128, 4, 8, 4, 1, 0), (128, 64, 1, 4, 4, 0, 1)
    monkeypatch.setattr(decode_gemm_module, "DECODE_GEMM_DEVICE_CONFIGS",
                        {"H200": ((16, 4096, 4096, small), (64, 4096, 16384, large), (64, 8192, 4096, wide))})
    assert config_for("NVIDIA H200", 2, 4096, 4096) == small and config_for("NVIDIA H200", 16, 4096, 4096) == small
    assert config_for("NVIDIA H200", 17, 4096, 4096) == large and config_for("NVIDIA H200", 8, 4096, 14336) == large
    assert config_for("NVIDIA H200", 64, 6144, 4096) == wide and config_for("NVIDIA H200", 64, 6144, 8192) is None
    assert config_for("NVIDIA H200", 65, 4096, 4096) is None and config_for("NVIDIA H100 80GB HBM3", 8, 64, 64) is None


def test_cpu_tensors_one_row_many_rows_and_the_switch_take_f_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    weight = torch.zeros(80, 64)
    assert not decode_gemm_available(torch.zeros(4, 64), weight)
    if torch.cuda.is_available():
        monkeypatch.setattr(decode_gemm_module, "DECODE_GEMM_DEVICE_CONFIGS", {"": ((1 << 20, 1 << 20, 1 << 20,
                                                                                     LAUNCHES[1]),)})
        x = torch.zeros(MAX_ROWS + 1, 64, device="cuda", dtype=torch.bfloat16)
        w = weight.to("cuda", torch.bfloat16)
        assert decode_gemm_available(x[:4], w) and decode_gemm_available(x[:MAX_ROWS], w)
        assert not decode_gemm_available(x[:1], w) and not decode_gemm_available(x, w)
        assert not decode_gemm_available(x[:4].float(), w)
        monkeypatch.setenv("PDLAUNCH_DECODE_GEMM", "cublas")
        assert not decode_gemm_available(x[:4], w)


@pytest.mark.gpu
def test_the_linear_layers_run_it_inside_a_cuda_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 row-parallel projection of the 8B down shape at 2, 7, 64 and 65 rows, captured and replayed: the
    kernel runs at up to 64 rows (F.linear does not), F.linear at 65, and the outputs equal F.linear's within bf16
    tolerance, the split counters left at zero."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("triton")
    monkeypatch.setattr(decode_gemm_module, "DECODE_GEMM_DEVICE_CONFIGS",
                        {"": ((16, 1 << 20, 1 << 20, (64, 128, 4, 4, 3, 1, 0)),
                              (64, 1 << 20, 1 << 20, (128, 64, 2, 8, 4, 0, 1)))})
    proj = parallel_linear.RowParallelLinear(14336, 4096, bias=False).to("cuda", torch.bfloat16)
    torch.manual_seed(0)
    proj.weight.data.normal_(0, 0.02)
    linear_rows: list[int] = []
    real = parallel_linear.F.linear
    monkeypatch.setattr(parallel_linear.F, "linear", lambda x, *a: linear_rows.append(x.shape[0]) or real(x, *a))
    for rows in (2, 7, 64, 65):
        x = torch.randn(rows, 14336, device="cuda", dtype=torch.bfloat16)
        proj(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = proj(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        want = real(x, proj.weight).float()
        assert ((out.float() - want).norm() / want.norm()).item() < 1e-2, rows
    assert set(linear_rows) == {65}, linear_rows
    assert not leftover(torch.device("cuda"))


@pytest.mark.gpu
def test_every_launch_in_the_device_table_equals_f_linear() -> None:
    """Each launch DECODE_GEMM_DEVICE_CONFIGS holds for this GPU, at 2 rows and the largest row count it serves,
    on a weight of the largest shape it covers (capped at Llama-3-8B's down projection)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("triton")
    name = torch.cuda.get_device_name()
    table = next((t for key, t in decode_gemm_module.DECODE_GEMM_DEVICE_CONFIGS.items() if key in name), ())
    if not table:
        pytest.skip(f"no launch in the table for {name}")
    torch.manual_seed(0)
    for max_rows, max_n, max_k, config in table:
        n, k = min(max_n, 6144), min(max_k, 14336)
        if config is None:  # cuBLAS for these calls
            assert not decode_gemm_available(torch.zeros(max_rows, k, device="cuda", dtype=torch.bfloat16),
                                             torch.zeros(n, k, device="cuda", dtype=torch.bfloat16))
            continue
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for rows in {2, max_rows}:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            if config_for(name, rows, n, k) != config:
                continue  # an earlier entry covers this call
            assert decode_gemm_available(x, weight)
            close_to(decode_gemm(x, weight), F.linear(x, weight))
    assert not leftover(torch.device("cuda"))
