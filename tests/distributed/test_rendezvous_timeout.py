"""parallel.rendezvous_timeout_seconds reaches every wait of a TP group's rendezvous, in both directions, and each
expired wait names the ranks that did not come, how long it waited and the setting that raises it.

It was a constant (120 s): a worker pod still pulling a multi-GB image made its leader give up, and LWS recreated the
whole group. Here the setting is cut to seconds and one rank never comes: rank 0 waiting for it to connect
(tp_startup.start_group) and to come to the join (wait_for_joins), a rank waiting for rank 0 to open the group
(init_tp_group), and a rank on another node waiting for rank 0's Setup (remote_rank.main, from its --deployment
file)."""

from __future__ import annotations

import json
import signal
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
import torch

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.distributed import remote_rank
from pdlaunch.distributed.join_waits import RENDEZVOUS_SETTING, joining_key, wait_for_joins
from pdlaunch.distributed.parallel_state import (
    SealedStore,
    connect_store,
    create_store,
    fresh_store_key,
    init_tp_group,
    store_key,
)
from pdlaunch.distributed.placement import PLACEMENT_ENV, RankPlacement, link_authkey
from pdlaunch.distributed.rank_listener import RankListener
from pdlaunch.distributed.tp_startup import start_group
from pdlaunch.errors import EngineError

HOST = "127.0.0.1"
TIMEOUT_S = 2.0
SLACK_S = 10.0  # a loaded 2-core machine's lateness; the waits checked here used to run 120 s


def config(timeout_s: float = TIMEOUT_S) -> DeploymentConfig:
    return DeploymentConfig.model_validate({"device": "cpu", "parallel": {"rendezvous_timeout_seconds": timeout_s}})


def spec(tp: int, master_port: int | None) -> InstanceSpec:
    return InstanceSpec(role="decode", port=8100, tp=tp, engine_id="e" * 32, master_port=master_port)


def test_rank0_names_the_rank_on_another_node_that_never_connects(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PLACEMENT_ENV, RankPlacement(nodes=[0, 1], hosts=[HOST, HOST]).model_dump_json())
    start = time.monotonic()
    with pytest.raises(EngineError) as failed:
        # the group fails before any rank builds its shard: no checkpoint is read
        start_group(config(), spec(2, None), None, torch.device("cpu"), torch.float32, 64,  # type: ignore[arg-type]
                    "float32")
    took = time.monotonic() - start
    assert TIMEOUT_S <= took < TIMEOUT_S + SLACK_S, f"rank 0 waited {took:.1f}s with the setting at {TIMEOUT_S}s"
    text = failed.value.message
    assert text.startswith(f"TP rank 1 on node 1 ({HOST}) did not connect to rank 0 at {HOST}:"), text
    assert f"within 2s ({RENDEZVOUS_SETTING})" in text, text
    assert RENDEZVOUS_SETTING in (failed.value.hint or "") and "image pull" in (failed.value.hint or "")


def test_rank0_names_the_rank_that_never_comes_to_the_join() -> None:
    raw = create_store(HOST, None, 3)
    key = fresh_store_key()
    rank0 = SealedStore(raw, key)
    connect_store(HOST, raw.port, key).set(joining_key(1), "1")  # rank 1 came; rank 2 never does
    idle = threading.Event()
    start = time.monotonic()
    with pytest.raises(EngineError) as failed:
        wait_for_joins(rank0, 3, TIMEOUT_S, idle.wait)  # no rank process to watch here
    took = time.monotonic() - start
    assert TIMEOUT_S <= took < TIMEOUT_S + SLACK_S, took
    assert failed.value.message == (f"TP rank 2 did not come to join the 3-rank group within 2s ({RENDEZVOUS_SETTING}; "
                                    "alive, but still starting)")
    assert failed.value.field == RENDEZVOUS_SETTING


def test_a_rank_waiting_for_rank0_names_the_rank_that_never_came() -> None:
    """Rank 1 came; rank 2 never does, so rank 0 never opens the group: rank 1 waits twice the setting (rank 0's
    wait for its ranks to connect, then to come), not torch's COLLECTIVE_TIMEOUT_S inside its join."""
    raw = create_store(HOST, None, 3)
    key = fresh_store_key()
    start = time.monotonic()
    with pytest.raises(EngineError) as failed:
        init_tp_group(1, 3, torch.device("cpu"), HOST, raw.port, connect_store(HOST, raw.port, key), 1.0)
    took = time.monotonic() - start
    assert 2.0 <= took < 2.0 + SLACK_S, took
    text = failed.value.message
    assert text.startswith(f"TP rank 1: rank 0 did not open the 3-rank group at {HOST}:{raw.port} within 2s of this "
                           f"rank coming to join (twice {RENDEZVOUS_SETTING}, 1s"), text
    assert text.endswith("; TP rank 2 had not come to the join"), text
    assert failed.value.field == RENDEZVOUS_SETTING


def test_a_rank_on_another_node_reads_the_setting_from_its_deployment(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 sends Setup once every rank on another node connected: with one never connecting, the rank that did
    waits the setting from its own --deployment file, then says so, naming it."""
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # main's handlers are for its own process
    cfg = config()
    raw = create_store(HOST, None, 3)
    instance = spec(3, raw.port)
    listener = RankListener(HOST, link_authkey(cfg, instance.name, raw.port))
    listener.publish(SealedStore(raw, store_key(cfg, instance, raw.port)))
    accepted: list[dict[int, Connection]] = []
    rank0 = threading.Thread(target=lambda: accepted.append(listener.accept({1: "node 1"}, SLACK_S * 3)), daemon=True)
    rank0.start()
    deployment = tmp_path / "deployment.json"
    deployment.write_text(cfg.model_dump_json())
    placement = RankPlacement(nodes=[0, 1, 2], hosts=[HOST] * 3).model_dump_json()
    errors: list[str] = []
    monkeypatch.setattr(remote_rank.log, "error", lambda text, *args: errors.append(text % args))
    start = time.monotonic()
    try:
        code = remote_rank.main(["--deployment", str(deployment), "--instance", json.dumps(instance.model_dump()),
                                 "--rank", "1", "--placement", placement])
        took = time.monotonic() - start
    finally:
        rank0.join(SLACK_S * 3)
        listener.close()
        for conn in (accepted[0].values() if accepted else []):
            conn.close()
    assert code == 1 and len(errors) == 1, errors
    assert TIMEOUT_S <= took < TIMEOUT_S + SLACK_S, took
    assert errors[0].startswith(f"TP rank 1 cannot join {instance.name}: {RENDEZVOUS_SETTING}: rank 0 of "
                                f"{instance.name} sent no setup within 2s ({RENDEZVOUS_SETTING}) of this rank "
                                "connecting"), errors[0]
