"""FP8 on one GPU: GEMM accuracy and speed at Llama-3-8B shapes, and model-level top-1 agreement.

    python benchmarks/fp8_bench.py --json OUT.json [--layers 4] [--skip-model]

1. GEMMs (per linear of the 8B shape: qkv 4096->6144, o 4096->4096, gate_up 4096->28672,
   down 14336->4096), M = 1 (decode) and 4096 (prefill): bf16 F.linear, FP8 per-channel
   (`torch._scaled_mm` row-wise) and FP8 128x128-block (Triton, model/quant/gemm.py).
   Accuracy: ||y - ref|| / ||ref|| against (a) float32 on the same quantized operands (kernel error)
   and (b) bf16 on the dequantized weight with unquantized activations (what the model sees).
   Speed: medians of CUDA-graph replays (triton.testing.do_bench_cudagraph), summed over 32 layers,
   with the decode floor = FP8 weight bytes / measured device-to-device copy bandwidth.
2. Model: `bench make-checkpoint` 8B-shaped checkpoints with `--layers` decoder layers (bf16, fp8 block,
   fp8 channel, same seed). Teacher-forced top-1 agreement over 8 prompts x 64 tokens that the bf16
   engine generated: prompt logprobs of prompt + continuation, last 64 positions. FP8 KV: the bf16
   model with --kv-cache-dtype fp8 and 32-token prefill chunks, so every chunk reads earlier tokens from
   the fp8 cache.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # limits.py

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
LAYERS = 32


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    import triton.testing

    src = torch.randn(2**28, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * 2 / (ms * 1e-3)


def gemms(out: dict[str, Any]) -> None:
    import triton.testing

    from pdlaunch.model.quant import fp8
    from pdlaunch.model.quant.activations import quantize_rows
    from pdlaunch.model.quant.block_gemv import GEMV_MAX_ROWS
    from pdlaunch.model.quant.gemm import block_fp8_linear, channel_fp8_linear

    torch.manual_seed(0)
    acc: dict[str, Any] = {}
    times: dict[str, dict[str, float]] = {}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda") * 0.02
        wb, sb = fp8.quantize_block(w)
        wc, sc = fp8.quantize_per_channel(w)
        sc_row = sc.reshape(1, -1).contiguous()
        wbf = w.bfloat16()
        for m in (1, 4096):
            x = torch.randn(m, k, device="cuda").bfloat16()
            # accuracy (fresh inputs per shape)
            yb = block_fp8_linear(x, wb, sb, torch.bfloat16)
            xq, xs = fp8.quantize_per_token_group(x)
            ref_b = (fp8.dequantize(xq, xs.repeat_interleave(128, 1)) @ fp8.dequantize(wb, sb, 128).t()
                     if m > GEMV_MAX_ROWS else x.float() @ fp8.dequantize(wb, sb, 128).t())  # weight-only
            xqc, xsc = quantize_rows(x, None)
            yc = torch._scaled_mm(xqc, wc.t(), scale_a=xsc, scale_b=sc_row, out_dtype=torch.bfloat16)
            ref_c = (xqc.float() * xsc) @ (wc.float() * sc.unsqueeze(1)).t()
            acc[f"{name}/M{m}"] = {
                "block_kernel": rel(yb, ref_b), "channel_kernel": rel(yc, ref_c),
                "block_vs_bf16": rel(yb, F.linear(x, fp8.dequantize(wb, sb, 128).bfloat16())),
                "channel_vs_bf16": rel(yc, F.linear(x, fp8.dequantize(wc, sc).bfloat16())),
                "bf16_vs_fp32": rel(F.linear(x, wbf), x.float() @ w.t()),
            }
            bench = {"bf16": functools.partial(F.linear, x, wbf),
                     "fp8_channel": functools.partial(channel_fp8_linear, x, wc, sc_row, torch.bfloat16),
                     "fp8_block": functools.partial(block_fp8_linear, x, wb, sb, torch.bfloat16)}
            for kind, fn in bench.items():
                fn()
                ms = triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median")
                times.setdefault(f"M{m}", {}).setdefault(kind, 0.0)
                times[f"M{m}"][kind] += ms * LAYERS
                times[f"M{m}"][f"{kind}/{name}"] = ms
        del w, wb, wc, wbf
    out["gemm_rel_error"] = acc
    out["gemm_ms_32_layers"] = times
    bw = copy_bandwidth()
    fp8_bytes = sum(n * k for n, k in SHAPES.values()) * LAYERS  # one byte per weight
    out["copy_bandwidth_GBps"] = bw / 1e9
    out["decode_floor_ms_fp8_linears"] = fp8_bytes / bw * 1e3
    out["decode_floor_ms_bf16_linears"] = 2 * fp8_bytes / bw * 1e3


SWEEP = {1: [(16, 16, 2, 4), (16, 16, 4, 6), (16, 32, 4, 4), (16, 32, 2, 6), (16, 64, 4, 4), (16, 128, 4, 3)],
         4096: [(128, 128, 8, 3), (128, 128, 4, 4), (64, 128, 4, 4), (64, 128, 4, 3), (128, 64, 4, 4),
                (128, 128, 8, 4), (64, 64, 4, 4)]}


def _time_config(fn: Any, label: str) -> float:
    """Median ms of `fn` replayed from a CUDA graph; NaN (and the error printed) for a config that fails."""
    import triton.testing

    try:
        fn()
        return float(triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median"))
    except Exception as exc:  # noqa: BLE001 (a config that does not compile is reported)
        print(f"{label}: {exc}", flush=True)
        return float("nan")


GEMV_SWEEP = [(bn, bk, w) for bn in (4, 8, 16, 32) for bk in (256, 512, 1024) for w in (4, 8)
              if bn * bk <= 16384]


def gemv_sweep(out: dict[str, Any]) -> None:
    """block_fp8_gemv configs (BLOCK_N, BLOCK_K, warps) per shape at M = 1 and 4, with the share of copy
    bandwidth each reaches (FP8 weight bytes / time)."""

    from pdlaunch.model.quant import fp8
    from pdlaunch.model.quant.block_gemv import block_fp8_gemv

    bw = copy_bandwidth()
    result: dict[str, dict[str, float]] = {}
    for name, (n, k) in SHAPES.items():
        wb, sb = fp8.quantize_block(torch.randn(n, k, device="cuda") * 0.02)
        floor_ms = n * k / bw * 1e3
        for m in (1, 4):
            x = torch.randn(m, k, device="cuda").bfloat16()
            row = result.setdefault(f"M{m}/{name}", {"floor_ms": floor_ms})
            for cfg in GEMV_SWEEP:
                row[str(cfg)] = _time_config(functools.partial(block_fp8_gemv, x, wb, sb, torch.bfloat16, cfg),
                                             f"{name} M{m} {cfg}")
            best = min((v, c) for c, v in row.items() if c != "floor_ms" and v == v)
            print(f"gemv M{m} {name}: best {best[1]} {best[0] * 1e3:.1f} us, floor {floor_ms * 1e3:.1f} us "
                  f"({floor_ms / best[0]:.0%} of copy bw)", flush=True)
    out["gemv_sweep_ms"] = result


# The shapes behind block_gemv.gemv_fold's rule: Llama-3-8B, Qwen3-30B-A3B (2048 / 5120 rows), Llama-3-70B (8192+).
FOLD_SHAPES = [(2048, 4096), (5120, 2048), (4096, 4096), (6144, 4096), (4096, 14336), (28672, 4096),
               (8192, 8192), (10240, 8192), (8192, 28672), (57344, 8192)]


def _fold_row(n: int, k: int, bw: float) -> dict[str, Any]:
    from limits import graph_call_ms

    from pdlaunch.model.quant import fp8
    from pdlaunch.model.quant.block_gemv import block_fp8_gemv, gemv_launch

    rotate = max(2, -(-(256 << 20) // (n * k)))
    weights = [fp8.quantize_block(torch.randn(n, k, device="cuda") * 0.02) for _ in range(rotate)]
    x = torch.randn(1, k, device="cuda").bfloat16()
    want = x.double() @ fp8.dequantize(*weights[0], 128).double().t()
    config, fold = gemv_launch(torch.cuda.get_device_name(), n, k)
    row: dict[str, Any] = {"n": n, "k": k, "floor_us": round(n * k / bw * 1e6, 2), "config": config, "chosen": fold}
    for fold in (False, True, False, True):
        got = block_fp8_gemv(x, *weights[0], torch.float32, None, fold)
        row[f"rel_err_{'on' if fold else 'off'}"] = round(rel(got, want), 6)
        us = graph_call_ms(lambda i, fold=fold: block_fp8_gemv(x, *weights[i % rotate], torch.bfloat16, None, fold),
                           20) * 1e3
        row.setdefault("on_us" if fold else "off_us", []).append(round(us, 2))
    return row


def gemv_fold(out: dict[str, Any]) -> None:
    """block_fp8_gemv at one row with its scales folded into x and not, per shape, with the config gemv_launch
    picks on this device, in CUDA-graph replays of 20 dependent calls over weights in rotation (at least 256 MB of
    them, so L2 holds none), twice each in the order off, on, off, on; with the fold gemv_launch picks."""
    bw = copy_bandwidth()
    rows = []
    for n, k in FOLD_SHAPES:
        row = _fold_row(n, k, bw)
        rows.append(row)
        print(f"gemv fold {n} x {k} ({'x'.join(map(str, row['config']))}): floor {row['floor_us']} us, "
              f"off {row['off_us']}, on {row['on_us']}, launched {'on' if row['chosen'] else 'off'}", flush=True)
    out["gemv_fold"] = rows
    out["copy_gbps"] = round(bw / 1e9, 1)


SWEEP_SHAPES = {"llama3-8b qkv": (6144, 4096), "llama3-8b o": (4096, 4096), "llama3-8b gate_up": (28672, 4096),
                "llama3-8b down": (4096, 14336), "qwen3-30b-a3b qkv": (5120, 2048), "qwen3-30b-a3b o": (2048, 4096)}
ROTATED_SWEEP = [(bn, bk, w) for bn in (4, 8, 16) for bk in (512, 1024, 2048) for w in (4, 8) if bn * bk <= 16384]


def _rotated_times(name: str, n: int, k: int) -> dict[str, float]:
    from limits import graph_call_ms

    from pdlaunch.model.quant import fp8
    from pdlaunch.model.quant.block_gemv import block_fp8_gemv

    rotate = max(2, -(-(256 << 20) // (n * k)))
    ws = [fp8.quantize_block(torch.randn(n, k, device="cuda") * 0.02) for _ in range(rotate)]
    x = torch.randn(1, k, device="cuda").bfloat16()
    times: dict[str, float] = {}
    for cfg in ROTATED_SWEEP:
        for fold in (False, True):
            label = f"{'x'.join(map(str, cfg))}{' fold' if fold else ''}"

            def call(i: int, cfg: tuple[int, int, int] = cfg, fold: bool = fold) -> torch.Tensor:
                return block_fp8_gemv(x, *ws[i % rotate], torch.bfloat16, cfg, fold)

            try:
                times[label] = round(graph_call_ms(call, 20) * 1e3, 2)
            except Exception as exc:  # noqa: BLE001 (a config that does not compile is reported)
                print(f"{name} {label}: {exc}", flush=True)
    return times


def gemv_rotated_sweep(out: dict[str, Any]) -> None:
    """block_fp8_gemv at one row over ROTATED_SWEEP's configs x folded or not, per model projection, weights in
    rotation (at least 256 MB, so L2 holds none; --gemv-sweep reuses one weight), us per call in CUDA-graph
    replays of 20 dependent calls; the best per shape and the launch the kernel takes today (gemv_launch)."""
    from pdlaunch.model.quant.block_gemv import gemv_launch

    bw = copy_bandwidth()
    result: dict[str, Any] = {}
    for name, (n, k) in SWEEP_SHAPES.items():
        times = _rotated_times(name, n, k)
        config, fold = gemv_launch(torch.cuda.get_device_name(), n, k)
        today = f"{'x'.join(map(str, config))}{' fold' if fold else ''}"
        best = min(times, key=times.__getitem__)
        result[name] = {"n": n, "k": k, "floor_us": round(n * k / bw * 1e6, 2), "today": today,
                        "today_us": times.get(today), "best": best, "best_us": times[best], "us": times}
        print(f"gemv rotated {name}: floor {result[name]['floor_us']} us, today {today} {times.get(today)} us, "
              f"best {best} {times[best]} us", flush=True)
    out["gemv_rotated_sweep"] = result
    out["copy_gbps"] = round(bw / 1e9, 1)


def sweep(out: dict[str, Any]) -> None:
    """block_fp8_linear configs (BLOCK_M, BLOCK_N, warps, stages) per shape: decode and prefill medians."""

    from pdlaunch.model.quant import fp8
    from pdlaunch.model.quant.gemm import block_fp8_linear

    result: dict[str, dict[str, float]] = {}
    for name, (n, k) in SHAPES.items():
        wb, sb = fp8.quantize_block(torch.randn(n, k, device="cuda") * 0.02)
        for m, configs in SWEEP.items():
            x = torch.randn(m, k, device="cuda").bfloat16()
            for cfg in configs:
                result.setdefault(f"M{m}/{name}", {})[str(cfg)] = _time_config(
                    functools.partial(block_fp8_linear, x, wb, sb, torch.bfloat16, cfg), f"{name} M{m} {cfg}")
    out["block_sweep_ms"] = result


# Decode-batch projections: the Llama-3-8B shapes and Qwen3-30B-A3B's attention (qkv 2048 -> 5120, o 4096 -> 2048).
SMALL_M_SHAPES = {**SHAPES, "moe_qkv": (5120, 2048), "moe_o": (2048, 4096)}
SPLIT_CONFIGS = [(64, 1, 4, 4), (64, 2, 4, 4), (64, 4, 4, 4), (64, 8, 4, 4), (32, 4, 4, 4), (64, 4, 4, 3),
                 (64, 4, 8, 4), (128, 2, 4, 4)]


def _time_into(row: dict[str, Any], timed: dict[str, Any], what: str, floor_us: float) -> None:
    """row[label_us] and row[label_of_copy] (floor / time) of each timed call."""
    for label, fn in timed.items():
        us = _time_config(fn, f"{what} {label}") * 1e3
        row[f"{label}_us"] = us
        row[f"{label}_of_copy"] = floor_us / us


def small_m(out: dict[str, Any], split_sweep: bool) -> None:
    """Block-FP8 projections at decode batches 2-64: the split GEMM as the linear layer runs it (`split`, x
    quantized by quantize_rows first) against the tiled GEMM it replaced (`quant+gemm`), in us per call and in
    share of copy bandwidth (FP8 weight bytes / time); with `split_sweep`, every SPLIT_CONFIGS entry too."""
    from pdlaunch.model.quant import fp8
    from pdlaunch.model.quant.gemm import _config, block_fp8_linear
    from pdlaunch.model.quant.split_gemm import block_fp8_split_gemm, split_config

    bw = copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows: list[dict[str, Any]] = []
    for name, (n, k) in SMALL_M_SHAPES.items():
        wb, sb = fp8.quantize_block(torch.randn(n, k, device="cuda") * 0.02)
        floor_us = n * k / bw * 1e6
        for m in (2, 16, 64):
            x = torch.randn(m, k, device="cuda").bfloat16()
            row: dict[str, Any] = {"shape": name, "m": m, "floor_us": floor_us, "split_config": split_config(n, k, sms)}
            timed = {"split": functools.partial(block_fp8_linear, x, wb, sb, torch.bfloat16),
                     "quant+gemm": functools.partial(block_fp8_linear, x, wb, sb, torch.bfloat16, _config(m))}
            if split_sweep:
                timed.update({f"split{cfg}": functools.partial(block_fp8_split_gemm, x, wb, sb, torch.bfloat16, cfg)
                              for cfg in SPLIT_CONFIGS})
            _time_into(row, timed, f"{name} M{m}", floor_us)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out["small_m"] = {"copy_bandwidth_GBps": bw / 1e9, "rows": rows}


def cublas_block(out: dict[str, Any]) -> None:
    """torch._scaled_mm with block scales (activations 1x128, weights 128x128; `cublas_block_linear`) against the
    Triton tiled GEMM and against what `block_fp8_linear` picks per row count: error against float32 on the same
    quantized operands, us per call (x quantized in each) at decode batches and one prefill size, and the share of
    copy bandwidth (FP8 weight bytes / time)."""
    from pdlaunch.model.quant import fp8
    from pdlaunch.model.quant.activations import quantize_rows
    from pdlaunch.model.quant.cublas_gemm import cublas_block_linear
    from pdlaunch.model.quant.gemm import _config, block_fp8_linear

    bw = copy_bandwidth()
    rows: list[dict[str, Any]] = []
    for name, (n, k) in SMALL_M_SHAPES.items():
        wb, sb = fp8.quantize_block(torch.randn(n, k, device="cuda") * 0.02)
        floor_us = n * k / bw * 1e6
        for m in (1, 2, 8, 16, 32, 64, 65, 128, 256, 4096):
            x = torch.randn(m, k, device="cuda").bfloat16()
            xq, xs = quantize_rows(x, 128)
            ref = (xq.float() * xs.repeat_interleave(128, 1)) @ fp8.dequantize(wb, sb, 128).t()
            row: dict[str, Any] = {"shape": name, "m": m, "floor_us": floor_us}
            timed = {"linear": functools.partial(block_fp8_linear, x, wb, sb, torch.bfloat16),
                     "triton_tiled": functools.partial(block_fp8_linear, x, wb, sb, torch.bfloat16, _config(m)),
                     "cublas": functools.partial(cublas_block_linear, x, wb, sb, torch.bfloat16)}
            row.update({f"{label}_rel": rel(fn(), ref) for label, fn in timed.items()})
            _time_into(row, timed, f"{name} M{m}", floor_us)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out["cublas_block"] = {"copy_bandwidth_GBps": bw / 1e9, "rows": rows}


def _engine(path: Path, **overrides: Any):  # noqa: ANN202
    from pdlaunch.engine.llm import LLM

    return LLM(str(path), device="cuda", dtype="bfloat16", max_model_len=512, num_gpu_blocks=512,
               block_size=16, **overrides)


def _top1(llm: Any, seqs: list[list[int]], last: int) -> list[list[int]]:
    from pdlaunch.engine.outputs import SamplingParams

    engine = llm.engine
    for i, seq in enumerate(seqs):
        engine.add_request(f"tf-{i}", seq, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1,
                                                         ignore_eos=True))
    got: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.prompt_logprobs is not None:
                got[o.request_id] = [max(p.top, key=p.top.get) if p is not None and p.top else -1
                                     for p in o.prompt_logprobs]
    return [got[f"tf-{i}"][-last:] for i in range(len(seqs))]


def model(out: dict[str, Any], layers: int, tmp: Path) -> None:
    from pdlaunch.bench.make_checkpoint import make_llama3_8b_shaped
    from pdlaunch.engine.outputs import SamplingParams

    t0 = time.monotonic()
    ckpts = {kind: make_llama3_8b_shaped(tmp / kind, num_layers=layers, device="cuda", fp8=fp8)
             for kind, fp8 in (("bf16", None), ("block", "block"), ("channel", "channel"))}
    out["checkpoints_s"] = time.monotonic() - t0
    rng = random.Random(0)
    prompts = [[rng.randrange(600, 128000) for _ in range(32)] for _ in range(8)]
    gen = 64
    bf16 = _engine(ckpts["bf16"])
    outs = bf16.generate(prompts, SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True))
    bf16.shutdown()
    seqs = [p + o.token_ids for p, o in zip(prompts, outs)]
    # Teacher forcing: every engine reads prompt + the bf16 continuation; its top-1 at the 64 positions
    # that predict the continuation is compared with the bf16 engine's greedy tokens.
    agreement: dict[str, float] = {}
    runs = {"bf16_prompt_logprobs": (ckpts["bf16"], {}), "fp8_block": (ckpts["block"], {}),
            "fp8_channel": (ckpts["channel"], {}),
            "fp8_kv": (ckpts["bf16"], {"kv_cache_dtype": "fp8", "max_num_batched_tokens": 32}),
            "bf16_chunked": (ckpts["bf16"], {"max_num_batched_tokens": 32})}
    for name, (path, overrides) in runs.items():
        llm = _engine(path, **overrides)
        got = _top1(llm, seqs, gen)
        llm.shutdown()
        pairs = [(a, b) for o, g in zip(outs, got) for a, b in zip(o.token_ids, g)]
        agreement[name] = sum(a == b for a, b in pairs) / len(pairs)
    out["top1_agreement_vs_bf16"] = agreement
    out["model_layers"] = layers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="time block GEMM configs first")
    parser.add_argument("--gemv-sweep", action="store_true", help="time weight-only decode kernel configs first")
    parser.add_argument("--gemv-fold", action="store_true",
                        help="only the one-row GEMV with its scales folded into x against not, per shape")
    parser.add_argument("--gemv-rotated-sweep", action="store_true",
                        help="only the one-row GEMV's configs x folded or not per model projection, weights rotated")
    parser.add_argument("--small-m", action="store_true",
                        help="only the decode-batch projections (M 2-64): split GEMM against quantize + GEMM")
    parser.add_argument("--split-sweep", action="store_true", help="with --small-m: every split configuration too")
    parser.add_argument("--cublas-block", action="store_true",
                        help="only torch._scaled_mm with block scales against our block-FP8 GEMMs (M 1-4096)")
    args = parser.parse_args()
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        if args.gemv_fold or args.gemv_rotated_sweep:
            if args.gemv_fold:
                gemv_fold(out)
            if args.gemv_rotated_sweep:
                gemv_rotated_sweep(out)
            return
        if args.cublas_block:
            cublas_block(out)
            return
        if args.small_m:
            small_m(out, args.split_sweep)
            return
        if args.gemv_sweep:
            gemv_sweep(out)
        if args.sweep:
            sweep(out)
            print(json.dumps(out["block_sweep_ms"]), flush=True)
        gemms(out)
        print(json.dumps({k: out[k] for k in out if k != "gemm_rel_error"}, indent=1), flush=True)
        if not args.skip_model:
            with tempfile.TemporaryDirectory() as tmp:
                model(out, args.layers, Path(tmp))
    finally:
        args.json.write_text(json.dumps(out, indent=2))
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
