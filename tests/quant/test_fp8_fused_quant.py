"""Activations quantized by the kernel that computes them (issue 27): the RMSNorm and the SwiGLU write a block-FP8
layer's input as Fp8Rows (fp8 per row and 128-column group, scales laid out as that layer's GEMM takes them), and
the layer skips its own quantize_rows launch. On CPU tensors under TRITON_INTERPRET=1 (a child pytest): the fused
kernels' values equal quantize_rows of the unfused ops' outputs bit for bit, row- and column-major, with MoE partial
rows, a masked last group and a width past the SwiGLU's 1024-column program; an FP8 MLP and its norm give the same
output with the fusion as without; and the routing that decides the layout (fp8_input_layout) on plain CPU. On
an FP8 GPU (`gpu`): the same MLP through the split GEMM, the tiled one and cuBLAS (column-major scales), and rows
cuBLAS would pad, which keep the layer's own launch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdlaunch.model.quant import fp8
from tests.engine.conftest import MakeEngine
from tests.model.interpreter import INTERPRET_AT_START, run_interpreter_child


@pytest.fixture
def interpret() -> None:
    pytest.importorskip("triton")
    if not INTERPRET_AT_START:
        pytest.skip("runs in the child of test_interpreter_cases_in_a_subprocess")


def _assert_rows_equal(got: fp8.Fp8Rows, q: torch.Tensor, s: torch.Tensor, column_major: bool) -> None:
    assert got.column_major is column_major and got.dtype == torch.bfloat16
    assert got.scales.stride() == ((1, got.q.shape[0]) if column_major else (got.scales.shape[1], 1))
    assert torch.equal(got.q.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(got.scales, s)


@pytest.mark.parametrize("column_major", [False, True])
@pytest.mark.parametrize("tokens,hidden,parts,residual", [
    (3, 256, 1, False),   # the first layer's input norm: no residual
    (4, 256, 1, True),
    (2, 384, 1, True),    # 3 groups in a 512-wide program: the last group masked
    (4, 128, 3, True),    # an MoE layer's [T, k, H] partial rows, summed in the kernel
])
def test_interpret_norm_quantizes_as_quantize_rows(interpret: None, tokens: int, hidden: int, parts: int,
                                                   residual: bool, column_major: bool) -> None:
    from pdlaunch.model.fused_norm import fused_add_rms_norm, rms_norm, rms_norm_fp8
    from pdlaunch.model.quant.activations import quantize_rows

    gen = torch.Generator().manual_seed(tokens * hidden + parts)
    shape = (tokens, parts, hidden) if parts > 1 else (tokens, hidden)
    x = (3 * torch.randn(shape, generator=gen)).bfloat16()
    x[0, ..., :128] = 0  # an all-zero group of the first row: the 1e-12 floor of its scale
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).bfloat16()
    res = torch.randn(tokens, hidden, generator=gen).bfloat16() if residual else None
    got, new_residual = rms_norm_fp8(x, weight, 1e-6, res, column_major)
    if res is None:
        want, want_residual = rms_norm(x, weight, 1e-6), None
    else:
        want, want_residual = fused_add_rms_norm(x, res, weight, 1e-6)
    q, s = quantize_rows(want, 128)
    _assert_rows_equal(got, q, s, column_major)
    assert (new_residual is None) == (want_residual is None)
    if new_residual is not None and want_residual is not None:
        assert torch.equal(new_residual, want_residual)


@pytest.mark.parametrize("column_major", [False, True])
@pytest.mark.parametrize("tokens,inter", [(3, 128), (4, 384), (2, 1152)])  # 1152: a second, partial program
def test_interpret_silu_and_mul_quantizes_as_quantize_rows(interpret: None, tokens: int, inter: int,
                                                           column_major: bool) -> None:
    from pdlaunch.model.fused_ops import silu_and_mul, silu_and_mul_fp8
    from pdlaunch.model.quant.activations import quantize_rows

    gen = torch.Generator().manual_seed(tokens + inter)
    gate_up = (4 * torch.randn(tokens, 2 * inter, generator=gen)).bfloat16()
    got = silu_and_mul_fp8(gate_up, column_major)
    q, s = quantize_rows(silu_and_mul(gate_up), 128)
    _assert_rows_equal(got, q, s, column_major)


@pytest.mark.parametrize("column_major", [False, True])
@pytest.mark.parametrize("seq_lens,launch", [
    ([1, 37, 90], None),           # one range a head: each program stores its heads' output
    ([9, 150, 200], (16, 4, 1, 4, 2)),  # several ranges: the last one of a head merges and stores
])
def test_interpret_attention_output_quantizes_as_quantize_rows(interpret: None, seq_lens: list[int],
                                                               launch: tuple[int, ...] | None,
                                                               column_major: bool) -> None:
    """The paged decode kernel writes the o projection's input as Fp8Rows (head_dim 128: a head is one group):
    the bytes and scales quantize_rows gives for paged_decode's bf16 output, whether the program that stores
    a head is the only range or the merging one."""
    from pdlaunch.model.decode_launch import DecodeLaunch
    from pdlaunch.model.fused_ops import write_kv
    from pdlaunch.model.quant.activations import quantize_rows
    from pdlaunch.model.triton_decode import paged_decode, paged_decode_fp8
    from tests.model.test_triton_decode import _case

    cache, q, kv, attn = _case("cpu", torch.bfloat16, seq_lens, 16, 2, 4, 128, None, layers=1)
    write_kv(cache, kv[0], kv[1], attn.slot_mapping[0], 0)
    tokens = torch.arange(len(seq_lens))
    args = (q, cache, 0, tokens, attn.block_tables[0], attn.seq_lens, None, 128**-0.5)
    chosen = DecodeLaunch(*launch) if launch is not None else None
    got = paged_decode_fp8(*args, column_major, launch=chosen)
    want, s = quantize_rows(paged_decode(*args, chosen).view(len(seq_lens), -1), 128)
    _assert_rows_equal(got, want, s, column_major)


def _fp8_mlp(hidden: int, inter: int, device: str = "cpu") -> torch.nn.Module:
    """An MLP and its post-attention norm whose linear layers hold 128x128-block FP8 weights, as finish_loading
    leaves them on an FP8 GPU."""
    from pdlaunch.model.arch import ModelArch
    from pdlaunch.model.decoder_layer import MLP
    from pdlaunch.model.quant.config import QuantConfig
    from pdlaunch.model.quant.linear import Fp8LinearMethod
    from pdlaunch.model.rms_norm import RMSNorm

    gen = torch.Generator().manual_seed(hidden + inter)
    mlp = MLP(ModelArch.model_construct(hidden_size=hidden, intermediate_size=inter, mlp_bias=False), 0, 1)
    quant = QuantConfig(scheme="block", source="checkpoint", scale_name="weight_scale_inv", description="test")
    for layer in (mlp.gate_up_proj, mlp.down_proj):
        q, s = fp8.quantize_block(0.05 * torch.randn(layer.weight.shape, generator=gen))
        layer.weight = torch.nn.Parameter(q, requires_grad=False)
        layer.weight_scale_fp8 = torch.nn.Parameter(s, requires_grad=False)
        layer.quant_method = Fp8LinearMethod(quant)
    norm = RMSNorm(hidden, 1e-6)
    norm.weight.data = (1 + 0.1 * torch.randn(hidden, generator=gen)).bfloat16()
    module = torch.nn.Module()
    module.mlp, module.norm = mlp, norm
    return module.to(device)


def test_interpret_fp8_mlp_gives_the_same_output_with_its_inputs_quantized_by_the_kernels_before(
        interpret: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """RMSNorm.into and the MLP: the norm hands gate_up Fp8Rows and the SwiGLU hands down_proj Fp8Rows (one
    quantize_rows launch fewer each); the output equals the run where each layer quantizes its own input."""
    from pdlaunch.model import fused_ops
    from pdlaunch.model.quant import activations, gemm

    module = _fp8_mlp(256, 384)
    gen = torch.Generator().manual_seed(7)
    o, residual = (torch.randn(4, 256, generator=gen).bfloat16() for _ in range(2))
    launches: list[str] = []
    real_quantize, real_silu = activations.quantize_rows, fused_ops.silu_and_mul_fp8
    monkeypatch.setattr(activations, "quantize_rows",
                        lambda *a, **k: launches.append("quantize") or real_quantize(*a, **k))
    monkeypatch.setattr("pdlaunch.model.decoder_layer.silu_and_mul_fp8",
                        lambda *a: launches.append("silu_fp8") or real_silu(*a))

    def run(fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x, new_residual = module.norm.into(module.mlp.gate_up_proj, o, residual)
        assert isinstance(x, fp8.Fp8Rows) is fused
        return module.mlp(x), new_residual

    fused_out, fused_residual = run(fused=True)
    assert launches == ["silu_fp8"]
    launches.clear()
    monkeypatch.setattr(gemm, "fp8_input_layout", lambda *a: None)
    plain_out, plain_residual = run(fused=False)
    assert launches == ["quantize", "quantize"]
    assert torch.equal(fused_out, plain_out) and torch.equal(fused_residual, plain_residual)


def test_interpreter_cases_in_a_subprocess() -> None:
    run_interpreter_child(__file__, "interpret_", "19 passed")


def test_layout_follows_the_gemm_block_fp8_linear_runs() -> None:
    """fp8_input_layout on CPU tensors (no CUDA: the GEMV or the tiled GEMM): one row reads x unquantized (None),
    more rows take row-major scales, a K not in 128-column groups is quantized by the layer itself."""
    from pdlaunch.model.quant.gemm import fp8_input_layout

    q, s = fp8.quantize_block(torch.randn(256, 384))
    assert fp8_input_layout(1, q, s) is None
    assert fp8_input_layout(0, q, s) is None
    assert fp8_input_layout(2, q, s) is False and fp8_input_layout(96, q, s) is False
    q, s = fp8.quantize_block(torch.randn(256, 200))
    assert fp8_input_layout(8, q, s) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with FP8 tensor cores (run `make test-gpu` on one)")
@pytest.mark.parametrize("rows,fused", [(2, True), (16, True), (48, True), (64, True), (66, False), (96, True)])
def test_gpu_fp8_mlp_equals_itself_unfused_on_every_gemm(rows: int, fused: bool,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """hidden 512, intermediate 2048: down_proj (16 K blocks) runs the split GEMM up to 64 rows, gate_up the tiled
    one; from 65 rows both run cuBLAS, which takes the scales column-major and 96 rows as they are, but would pad
    66 (no fusion there). Output and residual equal the unfused run's bit for bit, eagerly and replayed from a
    CUDA graph."""
    from pdlaunch.model.quant import gemm, split_gemm

    module = _fp8_mlp(512, 2048, "cuda")
    o, residual = (torch.randn(rows, 512, device="cuda").bfloat16() for _ in range(2))
    layout = gemm.fp8_input_layout(rows, module.mlp.down_proj.weight, module.mlp.down_proj.weight_scale_fp8)
    assert layout is ((rows > split_gemm.SPLIT_MAX_ROWS) if fused else None)

    def run(quantized: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x, new_residual = module.norm.into(module.mlp.gate_up_proj, o, residual)
        assert isinstance(x, fp8.Fp8Rows) is quantized
        return module.mlp(x), new_residual

    out, new_residual = run(fused)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replay_out, replay_residual = run(fused)
    graph.replay()
    monkeypatch.setattr(gemm, "fp8_input_layout", lambda *a: None)
    plain_out, plain_residual = run(False)
    torch.cuda.synchronize()
    for got in (out, replay_out):
        assert torch.equal(got, plain_out)
    for got in (new_residual, replay_residual):
        assert torch.equal(got, plain_residual)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with FP8 tensor cores (run `make test-gpu` on one)")
def test_gpu_fp8_model_decodes_the_same_with_its_inputs_quantized_by_the_kernels_before(
        tmp_path: Path, make_engine: MakeEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A block-FP8 Qwen3 (head_dim 128) served in bf16 on the GPU, four prompts decoded together (CUDA graphs):
    the attention kernel, the norms and the SwiGLU hand their block-FP8 layers Fp8Rows, and the tokens and their
    logprobs equal the run where every layer quantizes its own input."""
    from pdlaunch.engine.outputs import SamplingParams
    from pdlaunch.model import attention
    from pdlaunch.model.quant import gemm
    from tests.engine.test_engine_parity import random_prompts
    from tests.helpers.fp8_checkpoints import make_fp8_qwen3

    served, _ = make_fp8_qwen3(tmp_path, "block")
    prompts = random_prompts([5, 21, 9, 14], seed=3)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2)
    attention_fp8: list[int] = []
    real = attention.paged_decode_fp8
    monkeypatch.setattr(attention, "paged_decode_fp8", lambda *a: attention_fp8.append(1) or real(*a))

    def run() -> dict[str, list[object]]:
        engine = make_engine(served, device="cuda", dtype="bfloat16")
        for i, prompt in enumerate(prompts):
            engine.add_request(f"p{i}", prompt, params)
        steps: dict[str, list[object]] = {f"p{i}": [] for i in range(len(prompts))}
        while engine.has_unfinished_requests():
            for out in engine.step():
                steps[out.request_id] += [(lp.token_id, lp.logprob) for lp in out.new_logprobs or []]
        assert all(len(tokens) == params.max_tokens for tokens in steps.values()), steps
        return steps

    fused = run()
    assert attention_fp8, "no decode step took the attention kernel's fp8 output"
    monkeypatch.setattr(gemm, "fp8_input_layout", lambda *a: None)
    assert run() == fused
