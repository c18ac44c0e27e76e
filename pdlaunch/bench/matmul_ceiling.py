"""The matrix-product ceiling a prefill's FLOP rate is a share of, measured on the prefill's own device in the
same `bench compare` run (issue 29: the saturated 1P1D prefill GPU against the matmul rate, target >= 70%).

`measure_in_child` runs `python -m pdlaunch.bench.matmul_ceiling` in a child process before any deployment
starts: the GPU is idle then, and the child's CUDA context is gone again before an instance sizes its KV cache
from the free memory. The child times an n x n x n product in the deployment's dtype (CUDA events on a GPU,
the host clock on CPU; warm-up first, median of repeats) and checks a slice of it against float64, so that a
broken kernel cannot report a rate.

`Yardstick.share` turns a rate point's prefill throughput (prompt tokens per second of prefill steps, one
instance; engine_load.py) into TFLOP/s with the model's FLOPs per prompt token (ModelInfo.prefill_flops) and
its share of the ceiling.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from pdlaunch.errors import ArgumentParser, PdlaunchError

CHILD_TIMEOUT_S = 180.0  # CUDA start-up plus the timing, on a busy host
SIZES = {"cuda": 8192, "cpu": 1024}  # large enough to run at the device's rate, small enough to take < 1 s
DTypeName = Literal["float32", "bfloat16", "float16"]


class MatmulCeiling(BaseModel):
    """An n x n x n product's rate on one device, in one dtype."""

    device: str  # "cuda:0 (NVIDIA H200)" or "cpu (8 threads)"
    dtype: DTypeName
    n: int = Field(gt=0)
    ms: float = Field(gt=0)
    tflops: float = Field(gt=0)


class Yardstick(BaseModel):
    """What a compare run measures prefill FLOP rates with: the model's FLOPs per prompt token at the
    workload's prompt length, and the ceiling (None, with the reason, when it could not be measured)."""

    input_len: int = Field(gt=0)
    flops_per_token: float = Field(gt=0)
    ceiling: MatmulCeiling | None = None
    no_ceiling: str | None = None  # why there is none

    def share(self, tokens_per_s: float | None) -> PrefillShare | None:
        """The FLOP rate of `tokens_per_s` prompt tokens per second (None when no prefill step ran)."""
        if not tokens_per_s:
            return None
        tflops = tokens_per_s * self.flops_per_token / 1e12
        return PrefillShare(tflops=tflops, of_matmul=tflops / self.ceiling.tflops if self.ceiling else None)


class PrefillShare(BaseModel):
    """A prefill instance's FLOP rate over its prefill steps, and its share of the ceiling (None: no ceiling)."""

    tflops: float
    of_matmul: float | None


def measure(device: Literal["cpu", "cuda"], gpu: int, dtype: DTypeName, repeat: int = 10) -> MatmulCeiling:
    """Time the product here (the child's side). Raises PdlaunchError when the device or the result is wrong."""
    import torch

    from pdlaunch.memory.platform import cuda_event

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    n = SIZES[device]
    if device == "cuda":
        if not torch.cuda.is_available() or gpu >= torch.cuda.device_count():
            raise PdlaunchError(f"GPU {gpu} is not visible to the matmul ceiling's process")
        where = torch.device("cuda", gpu)
        name = f"cuda:{gpu} ({torch.cuda.get_device_name(gpu)})"
    else:
        where = torch.device("cpu")
        name = f"cpu ({torch.get_num_threads()} threads)"
    gen = torch.Generator(device=where).manual_seed(0)
    a = torch.randn(n, n, device=where, dtype=torch_dtype, generator=gen)
    b = torch.randn(n, n, device=where, dtype=torch_dtype, generator=gen)
    out = torch.empty(n, n, device=where, dtype=torch_dtype)
    times = []
    for i in range(repeat + 2):  # the first two warm up (kernel choice, caches)
        if device == "cuda":
            start, end = cuda_event(timing=True), cuda_event(timing=True)
            start.record()
            torch.mm(a, b, out=out)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            ms = (time.perf_counter() - t0) * 1e3
        if i >= 2:
            times.append(ms)
    reference = a[:16].double() @ b.double()
    error = ((out[:16].double() - reference).norm() / reference.norm()).item()
    bound = 1e-4 if dtype == "float32" else 2e-2
    if not error < bound:
        raise PdlaunchError(f"the {dtype} product on {name} is wrong (relative error {error:.2e} > {bound:g})")
    median = statistics.median(times)
    return MatmulCeiling(device=name, dtype=dtype, n=n, ms=median, tflops=2 * n**3 / median / 1e9)


def measure_in_child(device: Literal["cpu", "cuda"], gpu: int, dtype: DTypeName) -> MatmulCeiling:
    """`measure` in a child process (see the module doc). Raises PdlaunchError with the child's last words."""
    argv = [sys.executable, "-m", "pdlaunch.bench.matmul_ceiling", "--device", device, "--gpu", str(gpu),
            "--dtype", dtype]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:  # run() kills and reaps the child before raising
        raise PdlaunchError(f"the matmul ceiling on {device} took more than {CHILD_TIMEOUT_S:g} s") from None
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise PdlaunchError(f"the matmul ceiling on {device} failed (exit {done.returncode}): {tail}")
    try:
        return MatmulCeiling.model_validate_json(done.stdout.strip().splitlines()[-1])
    except (ValidationError, IndexError) as exc:
        raise PdlaunchError(f"the matmul ceiling on {device} printed no result: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m pdlaunch.bench.matmul_ceiling", description=__doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"], required=True)
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], required=True)
    args = parser.parse_args(argv)
    try:
        ceiling = measure(args.device, args.gpu, args.dtype)
    except PdlaunchError as exc:
        print(f"error: {exc.render()}", file=sys.stderr)
        return 1
    print(ceiling.model_dump_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
