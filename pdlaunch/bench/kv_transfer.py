"""`pdlaunch bench kv-transfer`: GB/s of one request's KV through the real connector path (NIXL, Mooncake).

Two processes (multiprocessing spawn): a prefill connector and a decode connector, each with a
synthetic KV cache in the engine's block-major layout. For every mode and prompt length the decode
side times start_load -> finished_recving (handshake done beforehand, as in steady state), checks
the moved bytes, and the same run measures a raw torch copy of the same number of bytes on the
decode device (and a peer copy prefill device -> decode device when they differ): the ceiling.
Push rows also split the time (medians, ms; time.monotonic() is one clock for both processes):
request = start_load -> the push request arrived on the prefill's side channel (decode loader thread, the
request on the wire), prepare = arrived -> about to post the WRITE (validation, prefill sender thread,
descriptors), post = NIXL's post call (on CPU DRAM UCX copies inside it),
write = posted -> a sender check saw it done, notify = done -> decode reported the load finished.
"""

from __future__ import annotations

import logging
import math
import secrets
import statistics
import time
from typing import TYPE_CHECKING

import torch

from pdlaunch.bench.kv_transfer_report import KVTransferRow
from pdlaunch.bench.kv_transfer_side import Side, dead_side_named, start_side
from pdlaunch.bench.kv_transfer_worker import DTYPES, Shape
from pdlaunch.config.strict_model import BLOCK_SIZES
from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.blocks import coalesce
from pdlaunch.model.quant.kv_cache import KV_CACHE_DTYPES, resolve_kv_cache_dtype

if TYPE_CHECKING:
    from pdlaunch.kv_transfer.prefill.push_sender import PushTiming

logger = logging.getLogger(__name__)


def _push_phases(
    loads: list[tuple[float, float, float]], timings: list[PushTiming | None]
) -> dict[str, float] | None:
    """Median ms of (request, prepare, post, write, notify) over the timed loads whose push the prefill side
    recorded."""
    phases: dict[str, list[float]] = {"request": [], "prepare": [], "post": [], "write": [], "notify": []}
    for (_, start, end), t in zip(loads, timings):
        if t is None:
            continue
        phases["request"].append(t.received - start)
        phases["prepare"].append(t.posting - t.received)
        phases["post"].append(t.posted - t.posting)
        phases["write"].append(t.done - t.posted)
        # The decode can learn of the finished WRITE (NIXL notification) before the prefill's sender thread
        # polls it done, so this slice may come out below 0 under load: it is then 0 (no wait for the notice).
        phases["notify"].append(max(0.0, end - t.done))
    if not phases["write"]:
        return None
    return {k: statistics.median(v) * 1e3 for k, v in phases.items()}


def _devices(device: str, decode_device: str | None) -> tuple[str, str]:
    if device == "cuda":
        device = "cuda:0"
    if decode_device is None:
        decode_device = device
        if device.startswith("cuda") and torch.cuda.device_count() > 1:
            decode_device = "cuda:1"
    return device, decode_device


def _check_device(device: str, flag: str) -> None:
    """cpu, cuda or cuda:N of a visible GPU, else a KVTransferError naming `flag` (not a worker's traceback)."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise KVTransferError(f"unknown device {device!r}", field=flag, hint="cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise KVTransferError(f"unsupported device {device!r}", field=flag, hint="cpu, cuda or cuda:N")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise KVTransferError(f"{device!r}: no CUDA device is visible on this machine", field=flag,
                                  hint="use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise KVTransferError(f"{device!r} does not exist (this machine has {count} GPUs: "
                                  f"cuda:0..cuda:{count - 1})", field=flag, hint="give a visible GPU")


def run_kv_transfer_bench(
    num_layers: int = 32, num_kv_heads: int = 8, head_dim: int = 128, dtype: str = "bfloat16", block_size: int = 16,
    num_tokens_list: list[int] | tuple[int, ...] = (1024, 8192), modes: list[str] | tuple[str, ...] = ("pull", "push"),
    device: str = "cpu", decode_device: str | None = None, iterations: int = 5, timeout: float = 60.0,
    cumem: bool = False, connector: str = "nixl", kv_cache_dtype: str = "auto", concurrency: int = 1,
) -> list[KVTransferRow]:
    """One row per (mode, num_tokens): bytes moved, median seconds, GB/s, raw copy GB/s of the same bytes.
    With `concurrency` K > 1 every timed transfer is K requests of `num_tokens` started at once (disjoint
    blocks): the row's bytes and seconds are those of all K, until the last one finished.

    `device` is the prefill device ("cpu", "cuda", "cuda:N"); decode runs on `decode_device`, by default
    the second GPU when there are two (NVLink case), else the same device. `cumem` puts both KV caches
    in CuMem pools, as the engine does with --enable-cumem-allocator. `connector`: nixl or mooncake.
    `kv_cache_dtype`: auto (= dtype) or fp8 (e4m3 blocks: half of bf16's bytes).
    """
    if concurrency < 1:
        raise KVTransferError(f"{concurrency} is below 1", field="--concurrency",
                              hint="pass 1 for one transfer at a time, or the number of requests in flight")
    for flag, value in (("--num-layers", num_layers), ("--num-kv-heads", num_kv_heads), ("--head-dim", head_dim),
                        ("--iterations", iterations)):
        if value < 1:
            raise KVTransferError(f"{value} is below 1", field=flag, hint="give a positive integer")
    if block_size not in BLOCK_SIZES:  # serve's: a block size no deployment runs measures nothing a user sees
        raise KVTransferError(f"{block_size} is not a block size pdlaunch serves", field="--block-size",
                              hint=f"one of {', '.join(map(str, BLOCK_SIZES))} (16 by default)")
    short = [n for n in num_tokens_list if n < 2]
    if short:
        raise KVTransferError(f"{short[0]} tokens move no KV (the decode side computes the last prompt "
                              "token itself)", field="--num-tokens", hint="give 2 tokens or more, e.g. 1024")
    if not (timeout > 0 and math.isfinite(timeout)):
        raise KVTransferError(f"{timeout:g} is not a positive number of seconds", field="--timeout",
                              hint="e.g. 60")
    if dtype not in DTYPES:
        raise KVTransferError(f"unknown dtype {dtype!r}", field="--dtype", hint=f"one of {', '.join(DTYPES)}")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise KVTransferError(f"unknown KV cache dtype {kv_cache_dtype!r}", field="--kv-cache-dtype",
                              hint=f"one of {', '.join(KV_CACHE_DTYPES)}")
    _check_device(device, "--device")
    if decode_device is not None:
        _check_device(decode_device, "--decode-device")
    cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype, DTYPES[dtype])
    prefill_device, decode_device = _devices(device, decode_device)
    max_blocks = -(-max(num_tokens_list) // block_size)
    shape = Shape(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype,
                  block_size=block_size, num_blocks=max_blocks * concurrency + 1, cumem=cumem, connector=connector,
                  kv_cache_dtype=kv_cache_dtype, secret=secrets.token_hex(32))
    block_bytes = num_layers * 2 * block_size * num_kv_heads * head_dim * cache_dtype.itemsize
    cache_gib = shape.num_blocks * block_bytes / 2**30
    rows: list[KVTransferRow] = []
    prefill = start_side("prefill", shape, prefill_device, cache_gib)
    decode = None
    try:
        decode = start_side("decode", shape, decode_device, cache_gib)
        for mode in modes:
            info = decode("mode", mode)
            for n in num_tokens_list:
                blocks = -(-(n - 1) // block_size)
                loads: list[tuple[float, float, float]] = []
                timings: list[PushTiming | None] = []
                for i in range(iterations + 1):  # the first is warm-up (handshake, registration caches)
                    decode("zero")
                    batch = []
                    for j in range(concurrency):
                        rid, ids = f"{mode}-{n}-{i}-{j}", list(range(j * blocks, (j + 1) * blocks))
                        batch.append((rid, n, ids, prefill("finish", rid, n, ids)))
                    loads.append(tuple(decode("load", batch, timeout)))
                    _wait_freed(prefill, [rid for rid, *_ in batch], timeout)
                    timings.append(prefill("push_timing", batch[0][0]) if concurrency == 1 else None)
                seconds = [load[0] for load in loads]
                verified = decode("sum", blocks * concurrency) == prefill("sum", blocks * concurrency)
                copies = decode("copy", blocks * concurrency, iterations, prefill_device)
                median = statistics.median(seconds[1:])
                nbytes = blocks * concurrency * block_bytes
                ids = list(range(blocks))
                rows.append({
                    "connector": connector, "transport": info.get("transport"),
                    "mode": info.get("transfer_mode", mode), "num_tokens": n, "concurrency": concurrency,
                    "bytes": nbytes,
                    "descriptors": len(coalesce(list(zip(ids, ids)))),
                    "seconds": median, "gbps": nbytes / median / 1e9, "raw_copy_gbps": copies["raw"],
                    "peer_copy_gbps": copies.get("peer"), "verified": verified,
                    "prefill_device": prefill_device, "decode_device": decode_device, "cumem": cumem,
                    "staging": info.get("staging"), "push_phases_ms": _push_phases(loads[1:], timings[1:]),
                })
                logger.info("kv-transfer %s %s %d tokens: %.2f GB/s (raw copy %.1f GB/s)", connector, mode, n,
                            rows[-1]["gbps"], copies["raw"])
    except KVTransferError as exc:
        raise dead_side_named(exc, (prefill, decode)) from None
    finally:
        if decode is not None:
            decode.close()
        prefill.close()
    return rows


def _wait_freed(prefill: Side, rids: list[str], timeout: float) -> None:
    """Until the prefill freed every one of `rids` (each is reported freed once)."""
    deadline = time.monotonic() + timeout
    pending = set(rids)
    while pending:
        pending -= set(prefill("freed"))
        if not pending:
            return
        if time.monotonic() > deadline:
            raise KVTransferError(f"prefill did not free requests {sorted(pending)} within {timeout:g}s")
        time.sleep(0.001)
