"""One side of `pdlaunch bench kv-transfer`, in its own process (multiprocessing spawn): a prefill or decode
connector on a synthetic KV cache in the engine's block-major layout, answering the parent's commands over a pipe
(kv_transfer_side.py is the parent's end). Timed loads, the moved bytes' checksum and the raw torch copies of the
same bytes run here, on the side's device."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any

import torch

from pdlaunch.errors import KVTransferError, PdlaunchError
from pdlaunch.kv_transfer.params import PrefillAnswer, RemoteDecodeRequest
from pdlaunch.model.quant.kv_cache import resolve_kv_cache_dtype

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
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
class Shape:
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


def worker(conn: Connection, role: str, shape: Shape, device: str) -> None:
    """One side: builds connectors on a synthetic KV cache and answers the parent's commands."""
    from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
    from pdlaunch.config.engine_config import ModelConfig
    from pdlaunch.config.kv_transfer_config import KVTransferConfig
    from pdlaunch.config.launcher_config import SecurityConfig
    from pdlaunch.kv_transfer.base import KVCacheSpec
    from pdlaunch.kv_transfer.factory import create_connector
    from pdlaunch.memory import platform

    _quiet_logging()
    try:
        dev = torch.device(device)
        if dev.type == "cuda":
            platform.set_device(dev.index or 0)
        dtype = DTYPES[shape.dtype]
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

