"""A connector in its own process with a KV cache in the engine's layout (random bytes, seeded).

The test calls connector methods by name plus helpers that read, corrupt and count.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from pdlaunch.kv_transfer.base import KVCacheSpec, KVConnectorEvents
from pdlaunch.kv_transfer.decode.context import HoldReleases
from pdlaunch.kv_transfer.handshake import DeviceInfo, HandshakeInfo, compat_fields, compat_hash
from pdlaunch.kv_transfer.params import PrefillAnswer, RemoteDecodeRequest
from tests.kv_transfer.rpc import Built, ProcessRPC


def make_spec(
    num_blocks: int = 24, block_size: int = 4, num_layers: int = 2, num_kv_heads: int = 2, head_dim: int = 8,
    dtype: torch.dtype = torch.float32, groups: int = 1, seed: int = 0, model_name: str = "test-llama",
    sliding_window: list[int | None] | None = None, device: str = "cpu", tp_size: int = 1, tp_rank: int = 0,
) -> KVCacheSpec:
    """kv_caches[g]: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim], random values."""
    gen = torch.Generator().manual_seed(seed)
    shape = (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)
    caches = [torch.randn(shape, generator=gen).to(dtype=dtype, device=device) for _ in range(groups)]
    return KVCacheSpec(
        kv_caches=caches, num_blocks=num_blocks, block_size=block_size, num_kv_heads=num_kv_heads,
        head_dim=head_dim, dtype=dtype,
        group_layers=[list(range(g * num_layers, (g + 1) * num_layers)) for g in range(groups)],
        group_sliding_window=sliding_window or [None] * groups, model_name=model_name,
        tp_size=tp_size, tp_rank=tp_rank,
    )


def handshake_for(spec: KVCacheSpec, **overrides: Any) -> HandshakeInfo:
    """A prefill's handshake that fits `spec` (one TP rank, on CPU), with `overrides`."""
    fields = compat_fields(spec)
    values: dict[str, Any] = dict(
        engine_id="P", agent_name="prefill-agent", agent_metadata="00",
        base_addrs=[(g + 1) << 20 for g in range(len(spec.kv_caches))],
        block_bytes=spec.block_bytes, num_blocks=spec.num_blocks, block_size=spec.block_size, dtype=fields["dtype"],
        kv_layout=fields["kv_layout"], num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
        group_layers=spec.group_layers, model_name=spec.model_name, tp_size=1, tp_rank=0,
        device=DeviceInfo(type="cpu"), compat_hash=compat_hash(fields))
    return HandshakeInfo(**{**values, **overrides})


def build_connector(config_json: str, instance_json: str, spec_kwargs: dict[str, Any],
                    staging_slots: int = 0) -> Built:
    from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
    from pdlaunch.kv_transfer.factory import create_connector
    from pdlaunch.metrics import kv_transfer as kv_metrics

    config = DeploymentConfig.model_validate_json(config_json)
    instance = InstanceSpec.model_validate_json(instance_json)
    spec = make_spec(**spec_kwargs)
    if staging_slots:  # what CuMem KV caches get on CUDA, forced here with a tiny buffer to chunk
        slot_bytes = sum(spec.block_bytes)
        connector = create_connector(config, instance, staging_bytes=staging_slots * slot_bytes)
    else:
        connector = create_connector(config, instance)
    assert connector is not None
    connector.register_kv_caches(spec)

    def blocks(group: int, ids: list[int]) -> torch.Tensor:
        return spec.kv_caches[group][torch.tensor(ids, dtype=torch.long)].clone()

    def corrupt(group: int, block: int) -> None:
        spec.kv_caches[group][block].view(-1)[:7] += 1.0

    def metric(name: str) -> float:  # a KV transfer series (metrics/kv_transfer.py) by name
        return float(getattr(kv_metrics, name)._value.get())

    handlers = {name: getattr(connector, name) for name in (
        "request_finished", "get_num_new_matched_tokens", "start_load", "get_finished", "abort_load", "info")}
    handlers.update(blocks=blocks, corrupt=corrupt, metric=metric)
    return handlers, connector.shutdown, connector.info()


class ConnectorProcess(ProcessRPC):
    def __init__(self, config: Any, instance: Any, staging_slots: int = 0, **spec_kwargs: Any) -> None:
        super().__init__(build_connector, config.model_dump_json(), instance.model_dump_json(), spec_kwargs,
                         staging_slots)

    def wait_events(self, predicate: Any, timeout: float = 30.0, what: str = "KV events") -> KVConnectorEvents:
        """Poll get_finished, merging events, until predicate(merged) holds."""
        return wait_events(lambda: self.call("get_finished"), predicate, timeout, what)


def wait_events(get_finished: Any, predicate: Any, timeout: float = 30.0, what: str = "KV events"
                ) -> KVConnectorEvents:
    """Call get_finished() until predicate(every field of every event so far, merged) holds."""
    merged = KVConnectorEvents()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = get_finished()
        merged.finished_sending |= ev.finished_sending
        merged.finished_recving |= ev.finished_recving
        merged.failed_recving.update(ev.failed_recving)
        merged.draining |= ev.draining
        merged.safe_to_free |= ev.safe_to_free
        if predicate(merged):
            return merged
        time.sleep(0.01)
    raise TimeoutError(f"waited {timeout}s for {what}; got {merged}")


def tp_prefill_answer(prefill: list[ConnectorProcess], rid: str, prompt: list[int],
                      block_ids: list[list[int]]) -> PrefillAnswer:
    """Every prefill rank holds the request; the params as TPConnector merges them (ports, checksums)."""
    answers = [p.call("request_finished", rid, prompt, RemoteDecodeRequest(do_remote_decode=True), block_ids)
               for p in prefill]
    params: PrefillAnswer = answers[0][1]
    if len(prefill) > 1:
        params = params.model_copy(update={
            "remote_ports": [int(p.info["side_channel"].rsplit(":", 1)[1]) for p in prefill],
            "rank_kv_checksums": [a[1].kv_checksum for a in answers], "kv_checksum": None})
    return params


def wait_releases_sent(releases: HoldReleases, timeout: float = 60.0) -> None:
    """Until every hold release and push cancel handed to the decode's release threads (LoadContext.release_soon)
    was sent, or given up on (each within RELEASE_TIMEOUT_SECONDS); AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while releases.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not releases.pending, f"{releases.pending} hold release(s) still pending after {timeout:g}s"
