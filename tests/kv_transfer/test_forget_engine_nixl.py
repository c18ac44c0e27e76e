"""forget_engine with real NIXL connectors on CPU: a prefill pushed to (or was READ by) two decode engines, one of
them dies; the prefill drops that engine's agent and serves the other on, and a decode drops a dead prefill."""

from __future__ import annotations

import pytest
import torch

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.config.kv_transfer_config import KVTransferConfig
from pdlaunch.kv_transfer.base import KVCacheSpec
from pdlaunch.kv_transfer.factory import create_connector
from pdlaunch.kv_transfer.nixl_connector import NixlConnector
from pdlaunch.kv_transfer.params import RemoteDecodeRequest
from tests.kv_transfer.deployment_secret import secured
from tests.kv_transfer.pd_procs import make_spec, wait_events

PROMPT = list(range(4 * 3 + 1))  # 3 full blocks move; the last token is recomputed
WAIT_S = 30.0


def _connector(role: str, engine_id: str, mode: str) -> NixlConnector:
    config = secured(DeploymentConfig(device="cpu", kv_transfer=KVTransferConfig(transfer_mode=mode)))
    connector = create_connector(config, InstanceSpec(role=role, port=1, engine_id=engine_id, device="cpu"))
    assert isinstance(connector, NixlConnector)
    return connector


def _start(prefill: NixlConnector, decode: NixlConnector, rid: str, remote: list[int], local: list[int]) -> None:
    _, params = prefill.request_finished(rid, PROMPT, RemoteDecodeRequest(do_remote_decode=True), [remote])
    assert params is not None
    decode.start_load(rid, PROMPT, params, [local], 0, decode.get_num_new_matched_tokens(rid, PROMPT, params, 0))


def _landed(prefill: NixlConnector, decode: NixlConnector, rid: str, p_spec: KVCacheSpec, d_spec: KVCacheSpec,
            remote: list[int], local: list[int]) -> None:
    ev = wait_events(decode.get_finished, lambda e: rid in e.finished_recving or rid in e.failed_recving, WAIT_S,
                     f"the load of request {rid}")
    assert ev.failed_recving == {}, ev.failed_recving
    wait_events(prefill.get_finished, lambda e: rid in e.finished_sending, WAIT_S, f"prefill to free {rid}")
    for d, p in zip(local[:3], remote[:3]):
        assert torch.equal(d_spec.kv_caches[0][d], p_spec.kv_caches[0][p]), (rid, d, p)


@pytest.mark.parametrize("mode", ["push", "pull"])
def test_a_prefill_forgets_the_dead_decode_and_serves_the_live_one_on(mode: str) -> None:
    """push: the prefill loaded each decode's memory to WRITE into it; pull: each decode's connection info
    (listen). Either way the dead engine's agent goes and the live one's stays, used by a load that runs while
    the dead one is forgotten and by one after."""
    prefill = _connector("prefill", "forget-P", mode)
    dead, live = _connector("decode", "forget-D0", mode), _connector("decode", "forget-D1", mode)
    try:
        p_spec, dead_spec, live_spec = make_spec(seed=1), make_spec(seed=2), make_spec(seed=3)
        for connector, spec in ((prefill, p_spec), (dead, dead_spec), (live, live_spec)):
            connector.register_kv_caches(spec)
        _start(prefill, dead, "r0", [3, 4, 5, 9], [7, 8, 9, 1])
        _landed(prefill, dead, "r0", p_spec, dead_spec, [3, 4, 5, 9], [7, 8, 9, 1])
        _start(prefill, live, "r1", [10, 11, 12, 9], [2, 3, 4, 5])
        _landed(prefill, live, "r1", p_spec, live_spec, [10, 11, 12, 9], [2, 3, 4, 5])
        assert prefill.info()["decode_engines"] == ["forget-D0", "forget-D1"]
        loaded = set(prefill.agent._remote_agents)  # type: ignore[attr-defined]
        dead.shutdown()  # the decode process is gone

        _start(prefill, live, "r2", [13, 14, 15, 9], [10, 11, 12, 13])  # in flight while the other is forgotten
        assert prefill.forget_engine("forget-D0") == 1
        _landed(prefill, live, "r2", p_spec, live_spec, [13, 14, 15, 9], [10, 11, 12, 13])
        assert prefill.info()["decode_engines"] == ["forget-D1"]
        assert len(loaded - set(prefill.agent._remote_agents)) == 1  # type: ignore[attr-defined]  # NIXL's too
        assert prefill.forget_engine("forget-D0") == 0
        _start(prefill, live, "r3", [16, 17, 18, 9], [14, 15, 16, 17])
        _landed(prefill, live, "r3", p_spec, live_spec, [16, 17, 18, 9], [14, 15, 16, 17])
        assert prefill.info()["decode_engines"] == ["forget-D1"]
    finally:
        for connector in (live, dead, prefill):
            connector.shutdown()


def test_a_decode_forgets_a_dead_prefill_and_shakes_hands_with_its_successor() -> None:
    dead, decode = _connector("prefill", "forget-P0", "push"), _connector("decode", "forget-D", "push")
    successor = _connector("prefill", "forget-P0-r1", "push")
    try:
        p_spec, d_spec, s_spec = make_spec(seed=1), make_spec(seed=2), make_spec(seed=4)
        for connector, spec in ((dead, p_spec), (decode, d_spec), (successor, s_spec)):
            connector.register_kv_caches(spec)
        _start(dead, decode, "r0", [3, 4, 5, 9], [7, 8, 9, 1])
        _landed(dead, decode, "r0", p_spec, d_spec, [3, 4, 5, 9], [7, 8, 9, 1])
        assert list(decode.info()["peers"]) == ["forget-P0@0"]  # type: ignore[arg-type]
        dead.shutdown()
        assert decode.forget_engine("forget-P0") == 1
        assert decode.info()["peers"] == {} and decode.receiver.peers.take_pushers() == {}
        _start(successor, decode, "r1", [6, 7, 8, 9], [2, 3, 4, 5])
        _landed(successor, decode, "r1", s_spec, d_spec, [6, 7, 8, 9], [2, 3, 4, 5])
        assert list(decode.info()["peers"]) == ["forget-P0-r1@0"]  # type: ignore[arg-type]
    finally:
        for connector in (decode, successor, dead):
            connector.shutdown()
