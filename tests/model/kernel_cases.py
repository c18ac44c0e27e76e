"""What the GEMM kernel tests (test_swiglu.py, test_decode_gemm.py) share: the `device` fixture (`kernel_device`,
imported into a test module to use it), which runs a case on CUDA (gpu marker) and on CPU under the Triton
interpreter (in the child pytest of tests/model/interpreter.py), and the bound a kernel result that sums in another
order than the reference must keep."""

from __future__ import annotations

import pytest
import torch

from tests.model.interpreter import INTERPRET_AT_START
from tests.model.test_fused_ops import _interpreter_rounds_bf16_to_nearest_even


@pytest.fixture(name="device", params=[pytest.param("cuda", marks=pytest.mark.gpu), "interpret"])
def kernel_device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    pytest.importorskip("triton")
    if request.param == "interpret":
        if not INTERPRET_AT_START:
            pytest.skip("runs in the child of test_interpreter_cases_in_a_subprocess")
        _interpreter_rounds_bf16_to_nearest_even(monkeypatch)
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return "cuda"


def close_to(got: torch.Tensor, want: torch.Tensor) -> None:
    """float32 within 1e-5; fp16/bf16 within two units in the last place (of each value, and of the largest)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    if want.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        ulp = 2.0 ** -7 if want.dtype == torch.bfloat16 else 2.0 ** -10
        torch.testing.assert_close(got.float(), want.float(), rtol=2 * ulp, atol=2 * ulp * want.abs().max().item())
