"""Programmatic dependent launch (pdl.pdl_enabled) and the GEMV's per-device launches."""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch

from pdlaunch.errors import PdlaunchError
from pdlaunch.model import fused_norm, fused_rotary
from pdlaunch.model import gemv as gemv_module
from pdlaunch.model import pdl as pdl_module
from pdlaunch.model.gemv import GEMV_CONFIG, GEMV_DEVICE_CONFIGS, config_for, gemv
from pdlaunch.model.pdl import pdl_enabled, pdl_kwargs

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                            reason="needs a CUDA GPU of sm_90 or newer")


def test_cpu_tensors_never_launch_dependently() -> None:
    assert not pdl_enabled(torch.zeros(1), 1)


def test_plain_launches_pass_no_pdl_keyword() -> None:
    # A Triton before 3.3 rejects launch keywords it does not know, so a plain launch must not name launch_pdl.
    assert pdl_kwargs(False) == {}
    assert pdl_kwargs(True) == {"launch_pdl": True}


def test_a_triton_without_the_launch_option_never_launches_dependently(monkeypatch: pytest.MonkeyPatch) -> None:
    old_compiler = types.ModuleType("triton.backends.nvidia.compiler")

    @dataclasses.dataclass
    class CUDAOptions:  # Triton 3.2's options: no launch_pdl
        num_warps: int = 4

    old_compiler.CUDAOptions = CUDAOptions  # type: ignore[attr-defined]
    old_cuda = types.ModuleType("triton.language.extra.cuda")
    monkeypatch.setitem(sys.modules, "triton.backends.nvidia.compiler", old_compiler)
    monkeypatch.setitem(sys.modules, "triton.language.extra.cuda", old_cuda)
    for name in ("triton", "triton.backends", "triton.backends.nvidia", "triton.language", "triton.language.extra"):
        if name not in sys.modules:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setattr(sys.modules["triton.language.extra"], "cuda", old_cuda, raising=False)
    pdl_module._triton_has_pdl.cache_clear()
    try:
        assert not pdl_module._triton_has_pdl()
    finally:
        pdl_module._triton_has_pdl.cache_clear()


def test_gemv_launch_per_device_and_rows() -> None:
    assert config_for("NVIDIA H200", 2048, 4096) == (8, 1024, 8)
    assert config_for("NVIDIA H200", 4096, 4096) == (4, 512, 4)
    assert config_for("NVIDIA H200", 6144, 4096) == (8, 1024, 8)
    assert config_for("NVIDIA H200", 5120, 2048) == (4, 512, 4)  # Qwen3-30B-A3B's qkv: short rows
    assert config_for("NVIDIA H200", 28672, 4096) == (16, 256, 4)
    assert config_for("NVIDIA H100 80GB HBM3", 4096, 14336) == (4, 512, 4)
    assert config_for("NVIDIA H100 80GB HBM3", 6144, 4096) == (8, 1024, 8)
    assert config_for("NVIDIA H100 80GB HBM3", 128256, 4096) == (8, 1024, 8)
    assert config_for("NVIDIA A100-SXM4-80GB", 28672, 4096) == GEMV_CONFIG  # no entry: the default
    for table in GEMV_DEVICE_CONFIGS.values():  # every config a power-of-two tile; the last entry covers all
        assert table[-1][:2] == (1 << 62, 1 << 62)
        for _, _, (rows, cols, warps) in table:
            assert rows & (rows - 1) == 0 and cols & (cols - 1) == 0 and warps in (1, 2, 4, 8)


@hopper
@pytest.mark.gpu
def test_pdl_follows_the_device_the_rows_and_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(1, device="cuda")
    assert pdl_enabled(x, 1)
    assert not pdl_enabled(x, 2)  # batches: their projections run through cuBLAS
    monkeypatch.setenv("PDLAUNCH_PDL", "off")
    assert not pdl_enabled(x, 1)


def _chain(x: torch.Tensor, residual: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
           norm_w: torch.Tensor) -> torch.Tensor:
    # A batch-1 decoder's kernels in a row, each reading what the one before wrote: norm, GEMV, GEMV with the
    # SiLU fused, fused add + norm, and so on; every launch dependent on the one before.
    h = fused_norm.rms_norm(x, norm_w, 1e-6)
    for up, down, square in weights:
        h = gemv(h, square)
        h, residual = fused_norm.fused_add_rms_norm(h, residual, norm_w, 1e-6)
        h = gemv(gemv(h, up), down, silu_mul=True)
        h, residual = fused_norm.fused_add_rms_norm(h, residual, norm_w, 1e-6)
    return h + residual


@hopper
@pytest.mark.gpu
def test_a_graph_of_dependent_launches_reads_only_finished_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replays with new inputs each time equal the same chain launched without PDL, bit for bit: a kernel that
    read before the one before it had finished would see the last replay's values (or none)."""
    torch.manual_seed(0)
    hidden, inter = 2048, 4096
    dt = torch.bfloat16
    weights = [((torch.randn(2 * inter, hidden, device="cuda") * 0.03).to(dt),
                (torch.randn(hidden, inter, device="cuda") * 0.02).to(dt),
                (torch.randn(hidden, hidden, device="cuda") * 0.03).to(dt)) for _ in range(6)]
    norm_w = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(dt)
    x = torch.randn(1, hidden, device="cuda", dtype=dt)
    residual = torch.randn(1, hidden, device="cuda", dtype=dt)
    assert pdl_enabled(x, 1)
    _chain(x, residual, weights, norm_w)  # compiles outside the capture
    out = torch.empty_like(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(_chain(x, residual, weights, norm_w))
    for seed in range(5):
        torch.manual_seed(100 + seed)
        x.copy_(torch.randn_like(x))
        residual.copy_(torch.randn_like(residual))
        graph.replay()
        with monkeypatch.context() as off:
            off.setenv("PDLAUNCH_PDL", "off")
            want = _chain(x, residual, weights, norm_w)
        torch.cuda.synchronize()
        assert torch.isfinite(want).all()
        torch.testing.assert_close(out, want, atol=0, rtol=0)


@cuda
@pytest.mark.gpu
def test_the_gemv_takes_its_device_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[str, int]] = []

    def recording(device_name: str, n: int, k: int) -> tuple[int, int, int]:
        asked.append((device_name, n, k))
        return (4, 256, 4)

    monkeypatch.setattr(gemv_module, "config_for", recording)
    w = (torch.randn(4096, 1024, device="cuda") * 0.02).to(torch.bfloat16)
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(gemv(x, w), gemv(x, w, config=(4, 256, 4)), atol=0, rtol=0)
    assert asked == [(torch.cuda.get_device_name(), 4096, 1024)]


@pytest.mark.gpu  # no GPU needed, but Triton's CUDA backend: make test-gpu is where it is installed
def test_the_gemv_waits_and_releases_only_when_launched_dependent() -> None:
    """Compiled for sm_90: with PDL the GEMV's PTX has the wait and the release, without it neither."""
    pytest.importorskip("triton.backends.nvidia")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels = gemv_module._kernels()
    for pdl in (True, False):
        constexprs = {"HAS_BIAS": False, "SILU_MUL": False, "BLOCK_N": 8, "BLOCK_K": 512, "PDL": pdl,
                      "X_CHUNK": kernels.x_chunk}
        types = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16"}
        signature = {name: "constexpr" if name in constexprs else types.get(name, "i32")
                     for name in kernels.gemv.arg_names}
        ptx = triton.compile(ASTSource(fn=kernels.gemv, signature=signature, constexprs=constexprs),
                             target=GPUTarget("cuda", 90, 32)).asm["ptx"]
        assert ("griddepcontrol.wait" in ptx) == pdl
        assert ("griddepcontrol.launch_dependents" in ptx) == pdl


def _attention_and_experts(x: torch.Tensor, p: dict[str, torch.Tensor], cache: torch.Tensor, slot: torch.Tensor,
                           table: torch.Tensor, seq_len: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, kv_scales: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    # One batch-1 layer's kernels from the qkv projection on, each dependent on the one before: the rotary
    # writes the newest K/V that the paged decode (which loads its block ids before it waits) must see, and
    # the router's top-k writes the ids the expert GEMMs read as their layout (no layout launch at one token); the
    # post-attention norm runs inside the router's launch, whose first program writes the rows the experts read.
    from pdlaunch.model.moe.fused import fused_moe
    from pdlaunch.model.moe.layout import TileConfig
    from pdlaunch.model.moe.router import norm_and_route
    from pdlaunch.model.triton_decode import paged_decode

    hq, hkv, dim = 8, 2, 128
    qkv = gemv(fused_norm.rms_norm(x, p["norm"], 1e-6), p["qkv"])
    q, k, v = qkv.view(1, hq + 2 * hkv, dim).split([hq, hkv, hkv], dim=1)
    q, _ = fused_rotary.rotary_write_kv(q, k, v, cos, sin, cache, slot, 0, kv_scales)
    attn = paged_decode(q, cache, 0, torch.zeros(1, dtype=torch.long, device=x.device), table, seq_len, None, 0.09,
                        kv_scales=kv_scales)
    h, residual, weights, ids = norm_and_route(gemv(attn.view(1, -1), p["o"]), x, p["norm"], 1e-6, p["router"], 8,
                                               True)
    tile = TileConfig(1 << 30, "triton", 16, 64, 128, 4, 3)
    return fused_moe(h, p["w13"], p["w2"], weights, ids, tile=tile) + residual


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("context", [100, 1000, 5000])
@pytest.mark.parametrize("early", ["on", "off"])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_attention_and_experts_launched_dependent_read_only_finished_results(
        monkeypatch: pytest.MonkeyPatch, context: int, early: str, cache_dtype: torch.dtype) -> None:
    """The decode kernel loads the sequence length and its first tile's block ids before it waits for the rotary
    that writes the newest K/V row, and (`early`, triton_decode.attention_early) lets the o projection start right
    after that wait, while it still computes; the expert GEMMs read the router's ids and normed rows with no launch
    between.
    A graph replayed with a new token and a new cache each time equals the same kernels launched plainly, bit for
    bit (a read of anything the kernel before writes, before the wait, would see the last replay's values)."""
    from pdlaunch.model.moe.align_kernels import few_assignments

    torch.manual_seed(1)
    dt, hidden, dim, block_size, experts = torch.bfloat16, 1024, 128, 16, 64
    p = {"norm": (1 + 0.1 * torch.randn(hidden, device="cuda")).to(dt),
         "qkv": (torch.randn(12 * dim, hidden, device="cuda") * 0.03).to(dt),
         "o": (torch.randn(hidden, 8 * dim, device="cuda") * 0.03).to(dt),
         "router": (torch.randn(experts, hidden, device="cuda") * 0.05).to(dt),
         "w13": (torch.randn(experts, 2 * 256, hidden, device="cuda") * 0.03).to(dt),
         "w2": (torch.randn(experts, hidden, 256, device="cuda") * 0.03).to(dt)}
    assert few_assignments(8, experts)
    blocks = -(-context // block_size)
    monkeypatch.setenv("PDLAUNCH_ATTN_EARLY", early)
    cache = torch.zeros(blocks + 3, 1, 2, block_size, 2, dim, device="cuda", dtype=cache_dtype)
    scales = (0.7, 1.3) if cache_dtype == torch.float8_e4m3fn else (1.0, 1.0)
    table = torch.randperm(blocks + 3, device="cuda")[:blocks].unsqueeze(0).contiguous()  # scattered blocks
    seq_len = torch.tensor([context], device="cuda")
    newest = table[0, (context - 1) // block_size] * block_size + (context - 1) % block_size
    slot = newest.view(1).long()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device="cuda").float() / dim))
    cos, sin = fused_rotary.rotary_cos_sin(seq_len - 1, inv_freq, dt)
    x = torch.randn(1, hidden, device="cuda", dtype=dt)
    assert pdl_enabled(x, 1)
    _attention_and_experts(x, p, cache, slot, table, seq_len, cos, sin, scales)  # compiles outside the capture
    out = torch.empty_like(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(_attention_and_experts(x, p, cache, slot, table, seq_len, cos, sin, scales))
    for seed in range(4):
        torch.manual_seed(200 + seed)
        x.copy_(torch.randn_like(x))
        cache.copy_(torch.randn(cache.shape, device="cuda"))  # the older rows change too
        graph.replay()
        with monkeypatch.context() as off:
            off.setenv("PDLAUNCH_PDL", "off")
            want = _attention_and_experts(x, p, cache, slot, table, seq_len, cos, sin, scales)
        torch.cuda.synchronize()
        assert torch.isfinite(want).all()
        torch.testing.assert_close(out, want, atol=0, rtol=0)


def test_a_gemv_launch_override_replaces_the_table_for_its_shape_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """PDLAUNCH_GEMV_CONFIG (benchmarks time a launch inside whole steps before it goes into the table)."""
    monkeypatch.setenv("PDLAUNCH_GEMV_CONFIG", "5120x2048=16,256,4:2048x4096=4,512,8")
    assert config_for("NVIDIA H100 80GB HBM3", 5120, 2048) == (16, 256, 4)
    assert config_for("NVIDIA A100-SXM4-80GB", 2048, 4096) == (4, 512, 8)  # any device
    assert config_for("NVIDIA H100 80GB HBM3", 6144, 4096) == (8, 1024, 8)  # other shapes: the table's
    for bad, words in (("5120x2048=16,256", "is not"), ("5120=16,256,4", "is not"), ("5120x2048=12,256,4", "powers"),
                       ("axb=1,2,4", "is not")):
        monkeypatch.setenv("PDLAUNCH_GEMV_CONFIG", bad)
        with pytest.raises(PdlaunchError) as caught:
            config_for("NVIDIA H200", 5120, 2048)
        assert caught.value.field == "PDLAUNCH_GEMV_CONFIG" and words in str(caught.value) and bad in str(caught.value)
