"""End to end: a TP-2 engine on one host (rank 0 here, rank 1 a worker process it spawned) keeps its rendezvous
store on loopback and uses it only sealed, under a key that only rank 0 and its workers hold. Another local user
who dials the port lists MACs, reads no value, and a value it overwrites stops the start with StoreTampered."""

from __future__ import annotations

import base64
import re
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from pdlaunch.distributed import tp_startup
from pdlaunch.distributed.join_waits import OPEN_KEY
from pdlaunch.distributed.parallel_state import (
    LOCAL_STORE_HOST,
    MAC_BYTES,
    NONCE_BYTES,
    SealedStore,
    StoreTampered,
    joining_key,
    store_key,
)
from pdlaunch.distributed.tp_executor import TPExecutor
from tests.tp.conftest import MakeTPEngine

SEALED_NAME = re.compile(r"pdlaunch/[0-9a-f]{64}")
WAIT_S = 60.0  # for rank 1 to write its gloo address once it came to the join, on a loaded 2-core machine


def raw_client(store: dist.Store) -> dist.TCPStore:
    """What another local user gets by dialling the port of rank 0's `store`: a plain TCPStore client."""
    port = getattr(store, "inner", store).port  # the TCPStore under the seal
    return dist.TCPStore(LOCAL_STORE_HOST, port, is_master=False, timeout=timedelta(seconds=5))


@pytest.mark.slow
def test_a_local_user_sees_only_macs_in_a_one_host_groups_store(llama_ckpt: Path,
                                                                 make_tp_engine: MakeTPEngine) -> None:
    engine = make_tp_engine(llama_ckpt, 2)
    executor = engine.executor
    assert isinstance(executor, TPExecutor)
    store = executor._store  # noqa: SLF001
    spy = raw_client(store)
    names = spy.list_keys()
    # rank 1's joining key, both groups' gloo addresses: all under MACs
    assert len(names) >= 5 and all(SEALED_NAME.fullmatch(n) for n in names), names
    for name in names:
        body = base64.b64decode(spy.get(name), validate=True)
        assert len(body) >= NONCE_BYTES + MAC_BYTES and LOCAL_STORE_HOST.encode() not in body, (name, body)
    # rank 1 (another process) sealed its joining key with rank 0's key
    assert isinstance(store, SealedStore) and store.check([joining_key(1)])
    # that key is fresh, not the one a rank could derive from the config (which need not hold a secret)
    assert not SealedStore(spy, store_key(engine.config, None, store.inner.port)).check([joining_key(1)])


@pytest.mark.slow
def test_a_value_a_local_user_overwrites_stops_the_start_with_store_tampered(
        llama_ckpt: Path, make_tp_engine: MakeTPEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once rank 1 came to the join and published its gloo address, a local user overwrites every value: rank 0
    reads that address next, and fails naming the tampering instead of dialling it."""
    came_to_join = tp_startup.wait_for_joins

    def then_tampered(store: SealedStore, size: int, timeout_s: float, watch: object) -> None:
        came_to_join(store, size, timeout_s, watch)  # type: ignore[arg-type]
        # open the group as rank 0 does next (join_waits.OPEN_KEY): rank 1 goes into gloo's join, publishing its address
        store.set(OPEN_KEY, "1")
        spy = raw_client(store)
        deadline = time.monotonic() + WAIT_S
        while len(spy.list_keys()) < 3:  # rank 1's joining key, the open key, then rank 1's gloo address
            assert time.monotonic() < deadline, "rank 1 wrote no gloo address"
            time.sleep(0.05)
        for name in spy.list_keys():
            spy.set(name, base64.b64encode(b"\x00" * (NONCE_BYTES + MAC_BYTES + 16)).decode())
        spy.num_keys()  # a request on the same connection returns once the sets are applied

    monkeypatch.setattr(tp_startup, "wait_for_joins", then_tampered)
    with pytest.raises(StoreTampered) as caught:
        make_tp_engine(llama_ckpt, 2)
    assert caught.value.field == "parallel.master_port"
    assert "that no rank of this group wrote" in caught.value.message, caught.value.message
