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

import contextlib
import logging
import math
import multiprocessing as mp
import secrets
import signal
import statistics
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch

from pdlaunch.bench.report import KVTransferRow
from pdlaunch.config.models import BLOCK_SIZES
from pdlaunch.errors import KVTransferError, PdlaunchError, exit_text
from pdlaunch.kv_transfer.blocks import coalesce
from pdlaunch.kv_transfer.params import PrefillAnswer, RemoteDecodeRequest
from pdlaunch.model.quant.kv_cache import KV_CACHE_DTYPES, resolve_kv_cache_dtype

if TYPE_CHECKING:
    from pdlaunch.kv_transfer.prefill.push_sender import PushTiming

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_CALL_TIMEOUT = 300.0
_POLL_SECONDS = 50e-6


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _copy_gbps(src: torch.Tensor, dst: torch.Tensor, iterations: int) -> float:
    dst.copy_(src)
    _sync(dst.device)
    _sync(src.device)
    t0 = time.perf_counter()
    for _ in range(iterations):
        dst.copy_(src)
    _sync(dst.device)
    _sync(src.device)
    return src.numel() * src.element_size() * iterations / (time.perf_counter() - t0) / 1e9


@dataclass(frozen=True)
class _Shape:
    """What both worker processes build their synthetic KV cache and connectors from."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_size: int
    num_blocks: int
    cumem: bool
    connector: str
    kv_cache_dtype: str
    secret: str  # both sides sign side-channel messages with it, as a deployment does


class _NoTraceback(logging.Formatter):
    def formatException(self, ei: tuple[type[BaseException], BaseException, TracebackType | None]
                        | tuple[None, None, None]) -> str:
        return ""


def _quiet_logging() -> None:
    """The connector's warnings and errors on this worker's stderr, each one line: the parent reports what failed
    (a load the connector logs with its traceback, say) as the user's error line."""
    handler = logging.StreamHandler()
    handler.setFormatter(_NoTraceback("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])


def _worker(conn: Connection, role: str, shape: _Shape, device: str) -> None:
    """One side: builds connectors on a synthetic KV cache and answers the parent's commands."""
    from pdlaunch.config.models import DeploymentConfig, InstanceSpec, KVTransferConfig, ModelConfig, SecurityConfig
    from pdlaunch.kv_transfer.base import KVCacheSpec
    from pdlaunch.kv_transfer.factory import create_connector
    from pdlaunch.memory import platform

    _quiet_logging()
    try:
        dev = torch.device(device)
        if dev.type == "cuda":
            platform.set_device(dev.index or 0)
        dtype = _DTYPES[shape.dtype]
        cache_dtype = resolve_kv_cache_dtype(shape.kv_cache_dtype, dtype)
        from pdlaunch.memory.cumem import memory_pool_context

        # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]; in a CuMem pool like the engine's
        # KV cache under --enable-cumem-allocator when asked.
        with memory_pool_context(shape.cumem, "kv_cache"):
            cache = torch.empty((shape.num_blocks, shape.num_layers, 2, shape.block_size,
                                 shape.num_kv_heads, shape.head_dim), dtype=cache_dtype, device=dev)
        if role == "prefill":
            cache.copy_(torch.randn(cache.shape, device=dev))  # normal_ has no fp8 kernel
        else:
            cache.zero_()
    except Exception as exc:  # the parent waits for this side's start: say why there is none (e.g. out of memory)
        conn.send(("err", f"{type(exc).__name__}: {exc}"))
        return
    spec = KVCacheSpec(kv_caches=[cache], num_blocks=shape.num_blocks, block_size=shape.block_size,
                       num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim, dtype=dtype,
                       group_layers=[list(range(shape.num_layers))], group_sliding_window=[None],
                       model_name="bench-kv", kv_cache_dtype=cache_dtype)
    # NixlConnector or MooncakeConnector: push timings and loads use more than the KVConnector interface.
    connector: Any = None

    def make(mode: str) -> Any:
        # enable_cumem_allocator as the engine's config would say: the connector then stages.
        config = DeploymentConfig(device=dev.type, model=ModelConfig(enable_cumem_allocator=shape.cumem),
                                  kv_transfer=KVTransferConfig(connector=shape.connector, transfer_mode=mode),
                                  security=SecurityConfig(deployment_secret=shape.secret))
        instance = InstanceSpec(role=role, port=1, engine_id=f"bench-{role}-{mode}", device=dev.type)
        c = create_connector(config, instance)
        assert c is not None
        c.register_kv_caches(spec)
        return c

    def region_sum(num_blocks: int) -> float:
        return float(cache[:num_blocks].double().sum())

    try:
        if role == "prefill":
            connector = make("auto")
        conn.send(("ok", None))
        while True:
            try:
                cmd, args = conn.recv()
            except (EOFError, OSError):  # the parent died (killed): nobody is left to answer
                break
            if cmd == "close":
                break
            try:
                if connector is None and cmd in ("finish", "freed", "push_timing", "load"):
                    raise ValueError(f"{cmd!r} before any connector was made (send 'mode' first)")
                if cmd == "mode":  # decode: a fresh connector for this mode
                    if connector is not None:
                        connector.shutdown()
                    connector = make(args[0])
                    result: object = connector.info()
                elif cmd == "finish":
                    rid, n, ids = args
                    result = connector.request_finished(rid, list(range(n)), RemoteDecodeRequest(do_remote_decode=True),
                                                        [ids])[1]
                elif cmd == "freed":
                    result = connector.get_finished().finished_sending
                elif cmd == "push_timing":  # prefill: the phases of the push of request args[0], if any
                    found = [t for t in connector.sender.push_timings() if t.request_id == args[0]]
                    result = found[-1] if found else None
                elif cmd == "load":
                    result = _timed_loads(connector, *args)
                elif cmd == "sum":
                    result = region_sum(args[0])
                elif cmd == "zero":
                    cache.zero_()
                    _sync(dev)
                    result = None
                elif cmd == "copy":
                    nbytes_blocks, iterations, peer = args
                    src = cache[:nbytes_blocks]
                    copies = {"raw": _copy_gbps(src, torch.empty_like(src), iterations)}
                    if peer and peer != device:
                        copies["peer"] = _copy_gbps(torch.empty_like(src, device=peer), torch.empty_like(src),
                                                    iterations)
                    result = copies
                else:
                    raise ValueError(f"unknown command {cmd}")
                conn.send(("ok", result))
            except Exception as exc:  # the parent shows it as the user's error line: what failed, not a traceback
                conn.send(("err", _one_line(exc)))
    finally:
        if connector is not None:
            connector.shutdown()
        with contextlib.suppress(OSError):  # the parent may be gone
            conn.send(("ok", None))


def _one_line(exc: Exception) -> str:
    return exc.render() if isinstance(exc, PdlaunchError) else f"{type(exc).__name__}: {exc}"


def _timed_loads(connector: Any, loads: list[tuple[str, int, list[int], PrefillAnswer]],
                 timeout: float) -> tuple[float, float, float]:
    """Start every (request id, tokens, block ids, params) load back to back: (seconds until the last one
    finished, time.monotonic() at the first start_load, at the last finished_recving)."""
    prompts = {rid: list(range(n)) for rid, n, _, _ in loads}
    external = {rid: connector.get_num_new_matched_tokens(rid, prompts[rid], params, 0) for rid, _, _, params in loads}
    start = time.monotonic()
    t0 = time.perf_counter()
    for rid, _, ids, params in loads:
        connector.start_load(rid, prompts[rid], params, [ids], 0, external[rid])
    pending = set(prompts)
    deadline = t0 + timeout
    while time.perf_counter() < deadline:
        events = connector.get_finished()
        for rid in pending & set(events.failed_recving):
            raise KVTransferError(events.failed_recving[rid])
        pending -= set(events.finished_recving)
        if not pending:
            return time.perf_counter() - t0, start, time.monotonic()
        # Yield the GIL between polls, as the engine does while only transfers are in flight: a busy
        # loop here would compete with the connector's loader thread for it.
        time.sleep(_POLL_SECONDS)
    raise KVTransferError(f"bench loads {sorted(pending)} did not finish within {timeout:g}s")


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


class _WorkerExited(KVTransferError):
    """A worker process is gone (killed for memory, by a user, or crashed in native code)."""


def _exit_text(code: int | None) -> str:
    """How a worker ended (errors.exit_text); None: its pipe closed, but its process has not exited within the wait."""
    return "closed its pipe but has not exited" if code is None else exit_text(code)


class _Side:
    def __init__(self, role: str, shape: _Shape, device: str) -> None:
        self.role = role
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, role, shape, device), daemon=True)
        # Ctrl-C reaches the whole process group: the worker is born ignoring SIGINT (the disposition survives
        # spawn's exec), and this process stops it, so that the connector shuts down once and no worker prints a
        # KeyboardInterrupt traceback, even during its imports.
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            self.proc.start()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        child.close()  # the worker's end: once the worker is gone, reading this end says so at once
        try:
            self._answer("start")
        except BaseException:  # Ctrl-C or a failed start: a worker still building its KV cache waits for nothing
            self.proc.kill()
            self.proc.join(10)
            raise

    def _exited(self, what: str) -> _WorkerExited:
        self.proc.join(5)  # the pipe closes as the process ends; its exit code comes a moment later
        return _WorkerExited(f"kv-transfer bench: the {self.role} worker {_exit_text(self.proc.exitcode)} "
                             f"before it answered {what}")

    def _answer(self, what: str) -> Any:
        deadline = time.monotonic() + _CALL_TIMEOUT
        while not self.conn.poll(1.0):  # a worker that died (e.g. killed for memory) answers nothing: say so
            if not self.proc.is_alive():
                raise self._exited(what)
            if time.monotonic() > deadline:
                raise KVTransferError(f"kv-transfer bench: the {self.role} worker did not answer {what} within "
                                      f"{_CALL_TIMEOUT:g}s")
        try:
            status, value = self.conn.recv()
        except (EOFError, OSError):  # poll() also returns at once for a pipe whose other end is gone
            raise self._exited(what) from None
        if status != "ok":
            raise KVTransferError(f"kv-transfer bench: {self.role} {what} failed in the worker: {value}")
        return value

    def __call__(self, cmd: str, *args: Any) -> Any:
        try:
            self.conn.send((cmd, args))
        except OSError:
            raise self._exited(cmd) from None
        return self._answer(cmd)

    def close(self) -> None:
        try:
            if self.proc.is_alive():
                self.conn.send(("close", ()))
                if self.conn.poll(30):
                    self.conn.recv()
        except (OSError, EOFError):
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


def _dead_side_named(exc: KVTransferError, sides: tuple[_Side | None, ...]) -> KVTransferError:
    """A command that failed because the other side's worker died (a decode load from a killed prefill ends in
    NIXL_ERR_REMOTE_DISCONNECT) says first which worker died."""
    if isinstance(exc, _WorkerExited):
        return exc
    for side in sides:  # a killed worker's connections close a moment before it can be reaped
        if side is not None:
            side.proc.join(0.5)
    dead = [side for side in sides if side is not None and not side.proc.is_alive()]
    if not dead:
        return exc
    return KVTransferError(f"kv-transfer bench: the {dead[0].role} worker "
                           f"{_exit_text(dead[0].proc.exitcode)} during the run; then "
                           + exc.message.removeprefix("kv-transfer bench: "), hint=exc.hint)


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


def _start_side(role: str, shape: _Shape, device: str, cache_gib: float) -> _Side:
    """One side's worker, started; a start that fails (most often: no memory for the KV cache) names the flags."""
    try:
        return _Side(role, shape, device)
    except KVTransferError as exc:
        raise KVTransferError(exc.message, hint=f"each side's synthetic KV cache is {cache_gib:.3g} GiB on {device}; "
                              "--num-tokens, --concurrency, --num-layers, --num-kv-heads and --head-dim set its size"
                              ) from None


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
    if dtype not in _DTYPES:
        raise KVTransferError(f"unknown dtype {dtype!r}", field="--dtype", hint=f"one of {', '.join(_DTYPES)}")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise KVTransferError(f"unknown KV cache dtype {kv_cache_dtype!r}", field="--kv-cache-dtype",
                              hint=f"one of {', '.join(KV_CACHE_DTYPES)}")
    _check_device(device, "--device")
    if decode_device is not None:
        _check_device(decode_device, "--decode-device")
    cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype, _DTYPES[dtype])
    prefill_device, decode_device = _devices(device, decode_device)
    max_blocks = -(-max(num_tokens_list) // block_size)
    shape = _Shape(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype,
                   block_size=block_size, num_blocks=max_blocks * concurrency + 1, cumem=cumem, connector=connector,
                   kv_cache_dtype=kv_cache_dtype, secret=secrets.token_hex(32))
    block_bytes = num_layers * 2 * block_size * num_kv_heads * head_dim * cache_dtype.itemsize
    cache_gib = shape.num_blocks * block_bytes / 2**30
    rows: list[KVTransferRow] = []
    prefill = _start_side("prefill", shape, prefill_device, cache_gib)
    decode = None
    try:
        decode = _start_side("decode", shape, decode_device, cache_gib)
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
        raise _dead_side_named(exc, (prefill, decode)) from None
    finally:
        if decode is not None:
            decode.close()
        prefill.close()
    return rows


def _wait_freed(prefill: _Side, rids: list[str], timeout: float) -> None:
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
