"""Qwen3-30B-A3B shape (random weights, bf16, one GPU): decode steps against the memory floor, and an
8k-token prefill against the bf16 matmul rate (issue 26), counted two ways: on the routed experts' FLOPs alone,
and on every FLOP of the active parameters (projections, routed experts, router, causal attention).

    python benchmarks/moe_speed.py [--batch 1 16 64 256] [--context 1024] [--prefill 8192 [3072 ...]]
        [--prefill-profile] [--num-layers 48] [--fp8-experts] [--ablate attention rotary router experts]
        [--variants NAME=VALUE ...] [--json OUT]

The weights are drawn on the GPU in place of a load (a 61 GB checkpoint would not fit the disk of a
benchmark host), through the same model, weight layout and engine as `pdlaunch serve` (bf16, CUDA
graphs, prefix caching off). Decode cells take the prompts' KV as already there
(benchmarks/ready_kv.py), so every timed step is a decode step of the whole batch.

floor = (attention, norm, router and lm_head bytes + the embedding rows read + the bytes of the experts
the step actually routes to + the KV bytes read) / copy bandwidth (benchmarks/limits.py, same run).
The experts routed per step are counted in one eager step of the batch, between the warm-up and the timed
steps, by a router that also marks each expert it picks (one index_fill per MoE layer into a [layers, experts]
table). The timed steps replay graphs captured without it: inside them its 48 kernels sat between the top-k and
the up GEMM of every layer and broke batch 1's chain of dependent launches (H100: 3.49 -> 3.38 ms).
prefill: one request of T tokens (8192 by default; each --prefill size in turn) in one step; its
active-expert FLOPs are 2 * T * k * 3 * H * I per layer, against the measured bf16 matmul rate.
--prefill-profile adds the GPU time of every kernel of one such request (torch.profiler), to set against
its wall time: what the host adds, and which kernels are far from the matmul rate.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from limits import (  # noqa: E402
    ARGMAX_VARIANTS,
    argmax_variant,
    copy_bandwidth,
    fill_kv_caches,
    matmul_rate,
    time_ms,
    untuned_fp8_gemv,
)
from ready_kv import ReadyKVConnector  # noqa: E402

import pdlaunch.model.moe.block as moe_block  # noqa: E402
import pdlaunch.runner.model_runner as model_runner  # noqa: E402
from pdlaunch.bench.checkpoint_shapes import QWEN3_30B_A3B  # noqa: E402
from pdlaunch.bench.checkpoint_tokenizer import write_tokenizer  # noqa: E402
from pdlaunch.config.model_info import load_model_info  # noqa: E402
from pdlaunch.engine.llm import build_config  # noqa: E402
from pdlaunch.engine.llm_engine import LLMEngine  # noqa: E402
from pdlaunch.engine.outputs import SamplingParams  # noqa: E402
from pdlaunch.model.checkpoint import Checkpoint  # noqa: E402
from pdlaunch.model.demo_tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, generation_config  # noqa: E402
from pdlaunch.model.loader import _materialize, fp8_experts, meta_model  # noqa: E402
from pdlaunch.model.moe.router import route  # noqa: E402

WARMUP_STEPS = 4
FP8_EXPERTS = False  # --fp8-experts: the drawn experts become 128x128-block fp8 as an FP8 checkpoint's do
FP8_ATTENTION = False  # --fp8-attention: the attention projections too (Qwen3-30B-A3B-FP8 quantizes both)
rng = random.Random(0)
PROFILED = itertools.count()
CELLS = itertools.count()


class DecodeReadyKV(ReadyKVConnector):
    """Decode requests (`d...`) find their prompt's KV ready; prefill requests (`p...`) compute theirs."""

    def get_num_new_matched_tokens(self, request_id: str, prompt_token_ids: list[int],
                                   kv_transfer_params: dict[str, Any] | None, num_local_computed_tokens: int) -> int:
        if request_id.startswith("p"):
            return 0
        return super().get_num_new_matched_tokens(request_id, prompt_token_ids, kv_transfer_params,
                                                  num_local_computed_tokens)


class RouteCounter:
    """Stands in for the MoE block's router during one eager step (`count_routed`): routes as before and marks
    each expert picked, per layer, in a device table."""

    def __init__(self, layers: int, experts: int, device: torch.device) -> None:
        self.hits = torch.zeros(layers, experts, dtype=torch.int32, device=device)
        self.calls = 0

    def __call__(self, logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids = route(logits, top_k, renormalize)
        self.hits[self.calls % self.hits.shape[0]].index_fill_(0, ids.reshape(-1), 1)
        self.calls += 1
        return weights, ids


def random_model(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, tp_rank: int = 0, tp_size: int = 1,
                 expert_parallel: bool = False, fp8_kv_cache: bool = False) -> torch.nn.Module:
    """The model with random weights drawn on `device` (std 0.02, norms 1) instead of a checkpoint load.
    Takes every argument the runner passes `load_model` (tests/bench/test_moe_speed_count.py); `fp8_kv_cache` asks
    nothing of it: random weights carry no k/v scales, so an fp8 KV cache runs with scales of 1.0."""
    model = meta_model(ckpt.arch, dtype, tp_rank, tp_size, expert_parallel)
    _materialize(model, device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    if FP8_EXPERTS:
        fp8_experts(model)
    if FP8_ATTENTION:
        fp8_attention(model)
    return model.eval()


def fp8_attention(model: torch.nn.Module) -> int:
    """The attention projections as 128x128-block fp8 (quantized from the drawn weights), as an FP8
    checkpoint such as Qwen3-30B-A3B-FP8 ships them; on a GPU without FP8 GEMMs they would stay bf16."""
    from pdlaunch.model.parallel_linear import ColumnParallelLinear, RowParallelLinear
    from pdlaunch.model.quant import fp8
    from pdlaunch.model.quant.config import QuantConfig
    from pdlaunch.model.quant.linear import Fp8LinearMethod

    quant = QuantConfig(scheme="block", source="checkpoint", scale_name="weight_scale_inv",
                        description="fp8 block 128x128 (benchmark)")
    count = 0
    for name, layer in model.named_modules():
        if ".self_attn." in f"{name}." and isinstance(layer, (ColumnParallelLinear, RowParallelLinear)):
            weight, scale = fp8.quantize_block(layer.weight.data.float())
            layer.weight = torch.nn.Parameter(weight, requires_grad=False)
            layer.weight_scale_fp8 = torch.nn.Parameter(scale.contiguous(), requires_grad=False)
            layer.quant_method = Fp8LinearMethod(quant)
            count += 1
    return count


def write_config(directory: Path, num_layers: int, overrides: dict[str, Any]) -> Path:
    cfg = {**QWEN3_30B_A3B, "num_hidden_layers": num_layers, **overrides, "torch_dtype": "bfloat16",
           "bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID}
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    (directory / "generation_config.json").write_text(json.dumps(generation_config()))
    write_tokenizer(directory, cfg["vocab_size"], cfg["max_position_embeddings"])
    return directory


ABLATIONS = ("attention", "rotary", "router", "experts", "norms")


def ablate(names: list[str], max_tokens: int, top_k: int, num_experts: int, hidden: int, dtype: torch.dtype,
           device: torch.device) -> None:
    """Takes kernels out of every step from here on, to find what each costs inside a decode step (with dependent
    launches a kernel's own time is not what the step saves without it). The model's outputs are then wrong:
    only step times mean anything. Up to `max_tokens` tokens (the decode batches) each stand-in launches no
    kernel: its fixed tensors are made here, before any graph capture. Longer steps (the warm-up's) get new ones.
    - attention: the paged decode returns q;
    - rotary: q and k pass on unrotated, and no K/V is written;
    - router: no router product or top-k; token t goes to experts (t + i * num_experts // top_k) % num_experts,
      i < top_k, each weighted 1 / top_k (the post-attention norm, folded into the router's product otherwise,
      runs as a kernel of its own);
    - experts: the MoE layers return zeros;
    - norms: every RMSNorm that adds a residual (`ablate_norms`; none folded into the router's product)."""
    import pdlaunch.model.attention as attention
    import pdlaunch.model.decoder_layer as decoder_layer
    import pdlaunch.model.moe.experts as moe_experts

    unknown = sorted(set(names) - set(ABLATIONS))
    if unknown:
        raise SystemExit(f"--ablate: unknown {unknown}; choose from {list(ABLATIONS)}")
    if "attention" in names:
        attention.paged_decode = lambda q, kv_cache, layer_in_group, tokens, *a, **kw: q[: tokens.shape[0]]
    if "rotary" in names:
        decoder_layer.rotary_write_kv = lambda q, k, *a, **kw: (q, k)  # type: ignore[assignment]
    if "router" in names:
        def routing(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            t = torch.arange(n, device=device)[:, None]
            ids = (t + torch.arange(top_k, device=device)[None, :] * (num_experts // top_k)) % num_experts
            weights = torch.full((n, top_k), 1.0 / top_k, device=device)
            return weights, ids, torch.zeros(n, num_experts, dtype=dtype, device=device)

        table = routing(max_tokens)

        def fixed(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # larger: eager steps only
            return (table[0][:n], table[1][:n], table[2][:n]) if n <= max_tokens else routing(n)

        moe_block.router_logits = lambda x, weight: fixed(x.shape[0])[2]  # type: ignore[assignment]
        moe_block.route = lambda lg, k, renormalize: fixed(lg.shape[0])[:2]  # type: ignore[assignment]
        moe_block.norm_route_available = lambda *args: False  # type: ignore[assignment]  # the norm stays
    if "experts" in names:
        rows = torch.zeros(max_tokens, top_k, hidden, dtype=dtype, device=device)
        sums = torch.zeros(max_tokens, hidden, dtype=dtype, device=device)

        def no_experts(x: torch.Tensor, *args: object, summed: bool = True, **kwargs: object) -> torch.Tensor:
            n = x.shape[0]
            if n > max_tokens:  # eager steps only (the warm-up's longest)
                return torch.zeros((n, hidden) if summed else (n, top_k, hidden), dtype=dtype, device=device)
            return sums[:n] if summed else rows[:n]

        moe_experts.fused_moe = no_experts  # type: ignore[assignment]
    if "norms" in names:
        ablate_norms()


def ablate_norms() -> None:
    """Every RMSNorm that adds a residual (two a layer; the first layer's input norm excepted) launches nothing
    and hands on the residual stream as its output: what a step would save if the norms lived inside the
    kernels around them. Outputs are wrong; step times only."""
    import pdlaunch.model.rms_norm as rms_norm

    rms_norm.fused_add_rms_norm = lambda x, residual, weight, eps: (residual, residual)  # type: ignore[assignment]
    moe_block.norm_route_available = lambda *args: False  # type: ignore[assignment]


def count_routed(engine: LLMEngine, counter: RouteCounter) -> int:
    """The experts one decode step of the running batch routes to, summed over the layers: that step runs eager
    (no decode or mixed graphs) with `counter` as the router, then the graphs and the router come back."""
    runner = engine.runner
    graphs, mixed = runner.graphs, runner.mixed
    runner.graphs = runner.mixed = None
    router, folded = moe_block.route, moe_block.norm_route_available
    moe_block.route = counter  # type: ignore[assignment]
    moe_block.norm_route_available = lambda *args: False  # type: ignore[assignment]  # every layer through `route`
    counter.hits.zero_()
    counter.calls = 0
    try:
        for _ in range(4):  # a step that only hands out admitted requests computes nothing
            engine.step()
            if counter.calls:
                break
        if counter.hits.is_cuda:
            torch.cuda.synchronize(counter.hits.device)
    finally:
        runner.graphs, runner.mixed = graphs, mixed
        moe_block.route, moe_block.norm_route_available = router, folded
    if counter.calls != counter.hits.shape[0]:
        raise SystemExit(f"the counting step routed {counter.calls} times, not once per MoE layer "
                         f"({counter.hits.shape[0]})")
    return int(counter.hits.sum())


def decode_cell(engine: LLMEngine, counter: RouteCounter, batch: int, context: int, steps: int,
                floor_fixed: int, expert_bytes: float, kv_per_token: int, bw: float, hidden: int,
                kernel_profile: bool = False) -> dict[str, Any]:
    params = SamplingParams(max_tokens=steps + WARMUP_STEPS + 1, temperature=0.0, ignore_eos=True)
    cell_id = next(CELLS)  # a batch may be timed more than once (--variants)
    for i in range(batch):
        engine.add_request(f"d{batch}-{cell_id}-{i}", [rng.randrange(600, 1000) for _ in range(context)], params)
    # With async scheduling a step returns before its GPU work ends, so steps are timed as a run: the
    # wall time from the first timed step to the end of the last one's GPU work, over their number.
    for _ in range(WARMUP_STEPS):
        engine.step()
    torch.cuda.synchronize()
    graphs = engine.runner.graphs
    if graphs is None or batch not in graphs.graphs:
        raise SystemExit(f"batch {batch} has no decode CUDA graph: raise max_num_seqs or capture sizes")
    mean_routed = count_routed(engine, counter)
    steps_run = 0
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        steps_run += 1
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / steps_run
    mean_ctx = context + WARMUP_STEPS + 1 + steps / 2  # the counting step came before the timed ones
    floor_bytes = floor_fixed + batch * hidden * 2 + mean_routed * expert_bytes + batch * mean_ctx * kv_per_token
    cell: dict[str, Any] = {"batch": batch, "context": context, "step_ms": step_s * 1e3, "steps": steps_run,
                            "experts_routed_per_step": mean_routed,
                            "experts_routed_per_layer": mean_routed / counter.hits.shape[0],
                            "floor_gb": floor_bytes / 1e9, "floor_ms": floor_bytes / bw * 1e3}
    cell["ratio"] = cell["step_ms"] / cell["floor_ms"]
    manager = engine.block_manager
    needed = batch * -(-(context + WARMUP_STEPS + 1 + steps) // manager.block_size)
    if needed > manager.num_blocks:  # requests were preempted and recomputed: step_ms is not a decode step
        cell["kv_cache_short"] = (f"the batch needs {needed} KV blocks, the cache holds {manager.num_blocks}: "
                                  "step_ms includes preemption and recomputation; replay_ms is the decode step")
    if graphs is not None and batch in graphs.graphs:
        cell["replay_ms"] = time_ms(graphs.graphs[batch][0].replay)
        cell["replay_ratio"] = cell["replay_ms"] / cell["floor_ms"]
        if kernel_profile:  # GPU time of each kernel of one replayed step, microseconds
            from moe_profile import profile_calls

            kernels = profile_calls(graphs.graphs[batch][0].replay, 20)
            cell["kernels_us"] = {name: round(us, 2) for name, us in list(kernels.items())[:30]}
            cell["kernels_total_us"] = sum(kernels.values())
    print(json.dumps(cell), flush=True)
    return cell


def prefill_cell(engine: LLMEngine, tokens: int, active_flops: float, model_flops: float,
                 tflops: float, kernel_profile: bool = False) -> dict[str, Any]:
    """`active_flops`: the routed experts' GEMMs alone; `model_flops`: everything a token multiplies through
    (projections, routed experts, router, causal attention, the last token's logits: ModelInfo.prefill_flops).
    The experts are ~42% of the model's FLOPs at 8k tokens, so their rate alone cannot pass ~42% of the matmul
    rate even if every kernel of the step ran at it ("expert_share_bound")."""
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    times = []
    for rep in range(3):
        engine.add_request(f"p{rep}", [rng.randrange(600, 1000) for _ in range(tokens)], params)
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        times.append(time.perf_counter() - t0)
    ms = min(times[1:]) * 1e3
    cell = {"prefill_tokens": tokens, "prefill_ms": ms, "active_expert_tflop": active_flops / 1e12,
            "active_expert_tflops_achieved": active_flops / ms / 1e9}
    cell["of_matmul_rate"] = cell["active_expert_tflops_achieved"] / tflops
    cell.update(model_tflop=model_flops / 1e12, model_tflops_achieved=model_flops / ms / 1e9,
                model_of_matmul_rate=model_flops / ms / 1e9 / tflops, expert_share_bound=active_flops / model_flops)
    if kernel_profile:  # GPU time of each kernel of one whole prefill request, microseconds; the rest is host
        from moe_profile import profile_calls

        def one() -> None:
            engine.add_request(f"profiled-{next(PROFILED)}", [rng.randrange(600, 1000) for _ in range(tokens)], params)
            while engine.has_unfinished_requests():
                engine.step()

        kernels = profile_calls(one, 2)
        cell["kernels_us"] = {name: round(us, 1) for name, us in list(kernels.items())[:30]}
        cell["kernels_total_us"] = sum(kernels.values())
    print(json.dumps(cell), flush=True)
    return cell


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--prefill", type=int, nargs="+", default=[8192],
                        help="prompt tokens of each prefill cell (0: none)")
    parser.add_argument("--prefill-profile", action="store_true",
                        help="also the GPU time of every kernel of each prefill cell's request")
    parser.add_argument("--num-layers", type=int, default=48)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.92)
    parser.add_argument("--fp8-experts", action="store_true",
                        help="experts as 128x128-block fp8 (attention, router and lm_head stay bf16)")
    parser.add_argument("--fp8-attention", action="store_true",
                        help="the attention projections as 128x128-block fp8 too, as Qwen3-30B-A3B-FP8 ships them")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                        help="fp8: the e4m3 KV cache (its bytes per token enter the floor at 1 byte per value)")
    parser.add_argument("--kernel-profile", type=int, nargs="*", default=[],
                        help="batches whose replayed decode step is profiled per CUDA kernel (torch.profiler)")
    parser.add_argument("--ablate", nargs="*", default=[], choices=ABLATIONS,
                        help="take these kernels out of every step (`ablate`): wrong outputs, for finding what each "
                             "costs in the step; decode cells only (--prefill 0)")
    parser.add_argument("--argmax", default="graph", choices=ARGMAX_VARIANTS,
                        help="where a step's greedy argmax runs (limits.argmax_variant), for an A/B in one call")
    parser.add_argument("--no-gemv-fold", action="store_true",
                        help="the block-FP8 GEMV (one row, --fp8-attention) as before its per-shape launches and the "
                             "fold rule (limits.untuned_fp8_gemv), for an A/B in one call")
    parser.add_argument("--variants", nargs="+", default=[], metavar="NAME=VALUE[,NAME=VALUE]",
                        help="environment settings read at each launch (e.g. PDLAUNCH_ATTN_EARLY=off), each in turn "
                             "with the decode graphs captured again under it, for an A/B in one call (a setting "
                             "stays for later variants until one sets it again)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.no_gemv_fold:
        untuned_fp8_gemv()
    argmax_variant(args.argmax)
    prefills = [n for n in args.prefill if n > 0]
    if args.ablate and prefills:
        parser.error("--ablate times decode steps only: add --prefill 0")
    global FP8_EXPERTS, FP8_ATTENTION
    FP8_EXPERTS, FP8_ATTENTION = args.fp8_experts, args.fp8_attention
    doc: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "num_layers": args.num_layers, "fp8_experts": args.fp8_experts,
                           "fp8_attention": args.fp8_attention, "kv_cache_dtype": args.kv_cache_dtype,
                           "gemv": "untuned" if args.no_gemv_fold else "tuned",
                           "argmax": args.argmax}
    doc.update(copy_bandwidth(2.0))
    doc.update(matmul_rate(8192))
    cfg = QWEN3_30B_A3B
    h, inter, experts, top_k = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"], \
        cfg["num_experts_per_tok"]
    counter = RouteCounter(args.num_layers, experts, torch.device("cuda"))  # count_routed puts it in place
    ablate(args.ablate, max(args.batch), top_k, experts, h, torch.bfloat16, torch.device("cuda"))
    doc["ablated"] = args.ablate
    model_runner.load_model = random_model  # type: ignore[assignment]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_config(Path(tmp), args.num_layers, {})
        info, _ = load_model_info(str(path))  # read while the directory exists
        assert info is not None, f"no model info from {path}"
        config = build_config(str(path), "cuda", "bfloat16", {
            "max_num_seqs": max(args.batch), "max_num_batched_tokens": max([8192, *prefills]),
            "enable_prefix_caching": False, "max_model_len": max([args.context + args.steps, *prefills]) + 64,
            "gpu_memory_utilization": args.gpu_memory_utilization, "kv_cache_dtype": args.kv_cache_dtype})
        engine = LLMEngine(config, connector=DecodeReadyKV())
    try:
        fill_kv_caches(engine.runner.kv_caches)  # never time reads of zeros
        params = dict(engine.runner.model.named_parameters())
        expert_param_bytes = sum(p.numel() * p.element_size() for n, p in params.items() if ".experts." in n)
        all_bytes = sum(p.numel() * p.element_size() for p in params.values())
        embed = params["model.embed_tokens.weight"]
        floor_fixed = all_bytes - expert_param_bytes - embed.numel() * embed.element_size()
        expert_bytes = expert_param_bytes / (args.num_layers * experts)  # one expert's bytes (fp8: + scales)
        arch = engine.checkpoint.arch
        kv_element = engine.runner.kv_caches[0].element_size()  # fp8 cache: 1 byte per value
        kv_per_token = arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim * kv_element
        doc.update(weight_gb=all_bytes / 1e9, expert_gb=expert_param_bytes / 1e9, fixed_floor_gb=floor_fixed / 1e9,
                   kv_bytes_per_token=kv_per_token, num_kv_blocks=engine.block_manager.num_blocks,
                   cuda_graphs=engine.runner.graphs is not None)
        print(json.dumps(doc), flush=True)
        bw = doc["copy_gbps"] * 1e9
        doc["decode"] = []
        for variant in args.variants or [None]:
            if variant is not None:  # read at each launch: the graphs are captured again under it
                for setting in re.split(r",(?=[A-Z_][A-Z0-9_]*=)", variant):  # a value may hold commas
                    name, _, value = setting.partition("=")
                    os.environ[name] = value
                engine.runner.graphs = None
                gc.collect()
                engine.runner.graphs = engine.runner._init_graphs()
            for b in args.batch:
                cell = decode_cell(engine, counter, b, args.context, args.steps, floor_fixed, expert_bytes,
                                   kv_per_token, bw, h, b in args.kernel_profile)
                doc["decode"].append({"variant": variant, **cell} if variant is not None else cell)
        doc["prefill"] = [prefill_cell(engine, n, 2 * n * top_k * 3 * h * inter * args.num_layers,
                                       info.prefill_flops(n), doc["matmul_tflops"], args.prefill_profile)
                          for n in prefills]
    finally:
        engine.shutdown()
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
