"""Once rank 0 opened the group, a rank's blocking reads of the store (NCCL's unique id, which rank 0 publishes
inside its own join) wait parallel_state.STORE_TIMEOUT_S, not parallel.rendezvous_timeout_seconds.

The setting bounds the waits before the open (join_waits.wait_for_open passes it explicitly). A local worker's and a
Ray rank's store client took it as its own timeout too, which every blocking read uses, and a rank on another node's
client the longer of it and remote_rank.STORE_WAIT_S (900 s): with the setting at 900 s (the Kubernetes manifests)
or a week, a rank 0 that hung between opening the group and publishing NCCL's id held every other rank that long
instead of failing them within STORE_TIMEOUT_S. A stand-in for NCCL here: no GPU."""

from __future__ import annotations

import re
import time

import pytest
import torch
import torch.distributed as dist

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.distributed import parallel_state
from pdlaunch.distributed.join_waits import OPEN_KEY
from pdlaunch.distributed.parallel_state import SealedStore, create_store, fresh_store_key, init_tp_group
from pdlaunch.distributed.rank import build_rank
from pdlaunch.distributed.remote_link import open_store
from pdlaunch.errors import EngineError

HOST = "127.0.0.1"
STORE_S = 2.0
RENDEZVOUS_S = 40.0  # what the read waited before
SLACK_S = 10.0  # a loaded 2-core machine's lateness


def nccl_like_init(*args: object, store: dist.Store, **kwargs: object) -> None:
    try:
        store.get("0")  # ProcessGroupNCCL::broadcastUniqueNCCLID: a blocking read, the client's own timeout
    except Exception as exc:  # noqa: BLE001 - as ProcessGroupNCCL catches std::exception
        raise dist.DistBackendError(f"[1] is setting up NCCL communicator ... got error: {exc}") from None


@pytest.mark.timeout(120)
def test_a_rank_whose_rank0_hangs_after_opening_fails_within_the_store_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel_state, "STORE_TIMEOUT_S", STORE_S)
    config = DeploymentConfig.model_validate({"device": "cpu", "parallel": {
        "tp": 2, "master_addr": HOST, "rendezvous_timeout_seconds": RENDEZVOUS_S}})
    raw = create_store(HOST, None, 2)
    key = fresh_store_key()
    SealedStore(raw, key).set(OPEN_KEY, "1")  # rank 0 opened the group, then hung before publishing NCCL's id

    monkeypatch.setattr(dist, "init_process_group", nccl_like_init)
    start = time.monotonic()
    with pytest.raises(EngineError) as failed:
        # the join fails before the shard is built: no checkpoint is read
        build_rank(1, config, None, None, torch.device("cpu"), torch.float32, 64, raw.port,  # type: ignore[arg-type]
                   key=key)
    took = time.monotonic() - start
    assert STORE_S <= took < STORE_S + SLACK_S, f"rank 1 waited {took:.1f}s for NCCL's id"
    assert "TP rank 1 could not join the 2-rank group" in failed.value.message, failed.value.message
    # the store read's own timeout ended it, not the join's (COLLECTIVE_TIMEOUT_S): the message says how soon
    assert re.search(rf"failed after \d+\.\ds, before its {parallel_state.COLLECTIVE_TIMEOUT_S:.0f}s wait ran out: ",
                     failed.value.message), failed.value.message


@pytest.mark.timeout(120)
def test_a_rank_on_another_node_whose_rank0_hangs_after_opening_fails_within_the_store_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """remote_rank.main's store client waits long for rank 0's store to come up; its reads do not."""
    monkeypatch.setattr(parallel_state, "STORE_TIMEOUT_S", STORE_S)
    raw = create_store(HOST, None, 2)
    key = fresh_store_key()
    SealedStore(raw, key).set(OPEN_KEY, "1")
    store = SealedStore(open_store(HOST, raw.port, RENDEZVOUS_S), key)
    monkeypatch.setattr(dist, "init_process_group", nccl_like_init)
    start = time.monotonic()
    with pytest.raises(EngineError):
        init_tp_group(1, 2, torch.device("cpu"), HOST, raw.port, store, RENDEZVOUS_S)
    took = time.monotonic() - start
    assert STORE_S <= took < STORE_S + SLACK_S, f"rank 1 waited {took:.1f}s for NCCL's id"
