"""The SwiGLU in the gate_up GEMM's epilogue (model/swiglu.py) against F.linear + silu_and_mul.

Kernel cases run on CUDA (gpu marker) and on CPU under the Triton interpreter, in a child pytest started with
TRITON_INTERPRET=1 (tests/model/interpreter.py). The kernel sums in another order than the reference's GEMM, so a
bf16 product may land one unit in the last place apart before the SiLU; the bound is two such units.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pdlaunch.model import decoder_layer, swiglu
from pdlaunch.model.decoder_layer import MLP
from pdlaunch.model.swiglu import config_for, swiglu_available, swiglu_gemm, swiglu_reference
from tests.model.interpreter import run_interpreter_child
from tests.model.kernel_cases import close_to, kernel_device  # noqa: F401 (the `device` fixture)

# (rows, hidden K, intermediate I): rows and columns that fill no tile, and K past one loop iteration.
SHAPES = [(2, 64, 48), (3, 96, 40), (17, 128, 72), (64, 160, 64)]
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, TMA): the pointer kernel and the TMA one
LAUNCHES = [(16, 32, 32, 4, 2, 0), (64, 16, 64, 4, 3, 0), (16, 32, 32, 4, 2, 1), (64, 16, 64, 4, 3, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize(("rows", "k", "inter"), SHAPES)
def test_the_kernel_equals_the_gemm_then_silu_and_mul(device: str, dtype: torch.dtype, launch: tuple[int, ...],
                                                      rows: int, k: int, inter: int) -> None:
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("the interpreter's float16 tiles: bf16 and float32 cover the rounding")
    torch.manual_seed(rows * 1000 + k)
    x = torch.randn(rows, k, dtype=dtype, device=device)
    weight = torch.randn(2 * inter, k, dtype=dtype, device=device) * k ** -0.5
    close_to(swiglu_gemm(x, weight, config=launch), swiglu_reference(x, weight))  # type: ignore[arg-type]


def test_rows_apart_in_a_wider_buffer_are_read_where_they_are(device: str) -> None:
    """x as a view into a wider buffer (rows further apart than K), as a decode step's slices are."""
    torch.manual_seed(3)
    wide = torch.randn(5, 96, dtype=torch.float32, device=device)
    x = wide[:, :64]
    weight = torch.randn(2 * 40, 64, dtype=torch.float32, device=device) * 0.1
    close_to(swiglu_gemm(x, weight, config=LAUNCHES[0]), swiglu_reference(x.contiguous(), weight))


def test_a_tma_launch_over_rows_tma_cannot_read_runs_the_pointer_kernel(device: str) -> None:
    """x starting 2 bytes past a 16-byte boundary, rows 130 bytes apart: TMA cannot describe it, so a TMA launch
    reads it through pointers and still equals the two launches."""
    torch.manual_seed(4)
    x = torch.randn(5, 65, dtype=torch.bfloat16, device=device)[:, 1:]
    weight = torch.randn(2 * 40, 64, dtype=torch.bfloat16, device=device) * 0.1
    close_to(swiglu_gemm(x, weight, config=LAUNCHES[3]), swiglu_reference(x.contiguous(), weight))


@pytest.mark.slow
def test_interpreter_cases_in_a_subprocess() -> None:
    run_interpreter_child(__file__, "interpret", timeout=420)


def test_a_weight_that_is_not_a_gate_up_pair_is_refused() -> None:
    x = torch.zeros(4, 64)
    with pytest.raises(ValueError, match="does not pair"):
        swiglu_gemm(x, torch.zeros(81, 64), config=LAUNCHES[0])
    with pytest.raises(ValueError, match="does not pair"):
        swiglu_gemm(x, torch.zeros(80, 32), config=LAUNCHES[0])


def test_the_device_table_picks_the_first_entry_that_covers_the_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    small, large = (16, 64, 128, 4, 4, 0), (128, 64, 64, 8, 3, 1)
    monkeypatch.setattr(swiglu, "SWIGLU_DEVICE_CONFIGS", {"H200": ((16, small), (32, None), (128, large))})
    assert config_for("NVIDIA H200", 2) == small and config_for("NVIDIA H200", 16) == small
    assert config_for("NVIDIA H200", 17) is None and config_for("NVIDIA H200", 32) is None
    assert config_for("NVIDIA H200", 33) == large and config_for("NVIDIA H200", 128) == large
    assert config_for("NVIDIA H200", 129) is None and config_for("NVIDIA H100 80GB HBM3", 8) is None


def test_cpu_tensors_one_row_and_the_switch_take_the_two_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without CUDA (or with one row, or PDLAUNCH_SWIGLU=cublas) the MLP keeps F.linear + silu_and_mul."""
    weight = torch.zeros(80, 64)
    assert not swiglu_available(torch.zeros(4, 64), weight)
    if torch.cuda.is_available():
        monkeypatch.setattr(swiglu, "SWIGLU_DEVICE_CONFIGS", {"": ((128, LAUNCHES[1]),)})
        x, w = torch.zeros(4, 64, device="cuda", dtype=torch.bfloat16), weight.to("cuda", torch.bfloat16)
        assert swiglu_available(x, w) and not swiglu_available(x[:1], w)
        monkeypatch.setenv("PDLAUNCH_SWIGLU", "cublas")
        assert not swiglu_available(x, w)


@pytest.mark.gpu
def test_the_mlp_runs_one_launch_for_a_decode_batch_inside_a_cuda_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 MLP of the 8B shape's width at 2, 7, 64 and 128 rows, captured and replayed: the kernel runs (the
    silu_and_mul launch does not) and the output equals the two-launch MLP within bf16 tolerance."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("triton")

    monkeypatch.setattr(swiglu, "SWIGLU_DEVICE_CONFIGS",
                        {"": ((16, (16, 64, 128, 4, 4, 0)), (128, (64, 64, 64, 4, 4, 1)))})
    arch = SimpleNamespace(hidden_size=4096, intermediate_size=1024, mlp_bias=False)
    mlp = MLP(arch, 0, 1).to("cuda", torch.bfloat16)  # type: ignore[arg-type]
    torch.manual_seed(0)
    mlp.gate_up_proj.weight.data.normal_(0, 0.02)
    mlp.down_proj.weight.data.normal_(0, 0.02)
    ran: list[int] = []
    real = decoder_layer.silu_and_mul
    monkeypatch.setattr(decoder_layer, "silu_and_mul", lambda t: ran.append(t.shape[0]) or real(t))
    for rows in (2, 7, 64, 128):
        x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
        mlp(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = mlp(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        want = mlp.down_proj(swiglu_reference(x, mlp.gate_up_proj.weight)).float()
        assert ((out.float() - want).norm() / want.norm()).item() < 1e-2, rows
    assert not ran, ran


@pytest.mark.gpu
def test_every_launch_in_the_device_table_equals_the_two_launches() -> None:
    """Each launch SWIGLU_DEVICE_CONFIGS holds for this GPU, at the first and last row count it serves, on
    Llama-3-8B's gate_up shape."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("triton")
    table = next((t for key, t in swiglu.SWIGLU_DEVICE_CONFIGS.items() if key in torch.cuda.get_device_name()), ())
    if not any(config for _, config in table):
        pytest.skip(f"no launch in the table for {torch.cuda.get_device_name()}")
    torch.manual_seed(0)
    weight = torch.randn(2 * 14336, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    first = 2
    for last, config in table:
        for rows in {first, last}:
            x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
            if config is None:
                assert not swiglu_available(x, weight)
                continue
            assert swiglu_available(x, weight) and config_for(torch.cuda.get_device_name(), rows) == config
            close_to(swiglu_gemm(x, weight), swiglu_reference(x, weight))
        first = last + 1
