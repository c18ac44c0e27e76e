"""A connector in its own process (multiprocessing spawn), driven over a pipe by the test.

Each process owns a KV cache in the engine's layout (random bytes, seeded per process), a real
connector from the factory, and answers calls: connector methods by name, plus helpers to read,
overwrite and compare blocks. Every call has a timeout; the process is reaped by `close`.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from typing import Any

import torch

from pdlaunch.kv_transfer.base import KVCacheSpec

CALL_TIMEOUT = 60.0


def make_spec(
    num_blocks: int = 24, block_size: int = 4, num_layers: int = 2, num_kv_heads: int = 2, head_dim: int = 8,
    dtype: torch.dtype = torch.float32, groups: int = 1, seed: int = 0, model_name: str = "test-llama",
    sliding_window: list[int | None] | None = None, device: str = "cpu",
) -> KVCacheSpec:
    """kv_caches[g]: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim], random values."""
    gen = torch.Generator().manual_seed(seed)
    shape = (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)
    caches = [torch.randn(shape, generator=gen).to(dtype=dtype, device=device) for _ in range(groups)]
    return KVCacheSpec(
        kv_caches=caches, num_blocks=num_blocks, block_size=block_size, num_kv_heads=num_kv_heads,
        head_dim=head_dim, dtype=dtype, group_layers=[list(range(g * num_layers, (g + 1) * num_layers)) for g in range(groups)],
        group_sliding_window=sliding_window or [None] * groups, model_name=model_name,
    )


def _serve(conn: Any, config_json: str, instance_json: str, spec_kwargs: dict[str, Any]) -> None:
    from pdlaunch.config.models import DeploymentConfig, InstanceSpec
    from pdlaunch.kv_transfer.factory import create_connector
    from pdlaunch import metrics

    connector = None
    try:
        config = DeploymentConfig.model_validate_json(config_json)
        instance = InstanceSpec.model_validate_json(instance_json)
        spec = make_spec(**spec_kwargs)
        connector = create_connector(config, instance)
        assert connector is not None
        connector.register_kv_caches(spec)
        conn.send(("ok", connector.info()))
    except Exception:
        conn.send(("err", traceback.format_exc()))
        return

    def blocks(group: int, ids: list[int]) -> torch.Tensor:
        return spec.kv_caches[group][torch.tensor(ids, dtype=torch.long)].clone()

    def write_blocks(group: int, ids: list[int], data: torch.Tensor) -> None:
        spec.kv_caches[group][torch.tensor(ids, dtype=torch.long)] = data

    def corrupt(group: int, block: int) -> None:
        spec.kv_caches[group][block].view(-1)[:7] += 1.0

    def metric(name: str) -> float:
        return float(getattr(metrics, name)._value.get())

    helpers = {"blocks": blocks, "write_blocks": write_blocks, "corrupt": corrupt, "metric": metric}
    while True:
        method, args = conn.recv()
        if method == "close":
            connector.shutdown()
            conn.send(("ok", None))
            return
        try:
            fn = helpers.get(method) or getattr(connector, method)
            conn.send(("ok", fn(*args)))
        except Exception:
            conn.send(("err", traceback.format_exc()))


class ConnectorProcess:
    def __init__(self, config: Any, instance: Any, **spec_kwargs: Any) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_serve, args=(child, config.model_dump_json(), instance.model_dump_json(), spec_kwargs), daemon=True
        )
        self.proc.start()
        self.info = self._result("start")

    def _result(self, what: str) -> Any:
        if not self._conn.poll(CALL_TIMEOUT):
            raise TimeoutError(f"connector process did not answer {what} within {CALL_TIMEOUT}s")
        status, value = self._conn.recv()
        if status == "err":
            raise RuntimeError(f"{what} failed in the connector process:\n{value}")
        return value

    def call(self, method: str, *args: Any) -> Any:
        self._conn.send((method, args))
        return self._result(method)

    def wait_events(self, predicate: Any, timeout: float = 30.0, what: str = "KV events") -> Any:
        """Poll get_finished, merging events, until predicate(merged) holds."""
        from pdlaunch.kv_transfer.base import KVConnectorEvents

        merged = KVConnectorEvents()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ev = self.call("get_finished")
            merged.finished_sending |= ev.finished_sending
            merged.finished_recving |= ev.finished_recving
            merged.failed_recving.update(ev.failed_recving)
            if predicate(merged):
                return merged
            time.sleep(0.01)
        raise TimeoutError(f"waited {timeout}s for {what}; got {merged}")

    def close(self) -> None:
        try:
            if self.proc.is_alive():
                self._conn.send(("close", ()))
                self._conn.poll(CALL_TIMEOUT) and self._conn.recv()
        finally:
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)
