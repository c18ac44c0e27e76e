"""The rendezvous store of a TP group on one host listens on loopback, which every local user of a shared
machine reaches. So it is sealed too: a raw client on loopback sees only MACs (no key name, no readable
value: gloo's addresses, the joining keys), and a value it overwrites stops the rank that reads it with
StoreTampered instead of being used (gloo reads the store from C++ and would report its own error)."""

from __future__ import annotations

import base64
import multiprocessing as mp
import re
import time
from collections.abc import Iterator
from datetime import timedelta
from multiprocessing.process import BaseProcess

import pytest
import torch
import torch.distributed as dist

from pdlaunch.distributed.join_waits import OPEN_KEY
from pdlaunch.distributed.parallel_state import (
    LOCAL_STORE_HOST,
    MAC_BYTES,
    NONCE_BYTES,
    SealedStore,
    StoreTampered,
    connect_store,
    create_store,
    destroy_tp_group,
    fresh_store_key,
    init_tp_group,
    joining_key,
)

SEALED_NAME = re.compile(r"pdlaunch/[0-9a-f]{64}")
WAIT_S = 60.0  # for a spawned rank to start (imports torch) and write its keys, on a loaded 2-core machine


def raw_client(port: int) -> dist.TCPStore:
    """What another local user gets by dialling the port: a plain TCPStore client."""
    return dist.TCPStore(LOCAL_STORE_HOST, port, is_master=False, timeout=timedelta(seconds=5))


def keys_appear(spy: dist.TCPStore, count: int, proc: BaseProcess) -> list[str]:
    """The store's names once at least `count` are there (the spawned rank wrote them)."""
    deadline = time.monotonic() + WAIT_S
    while len(names := spy.list_keys()) < count:
        assert proc.is_alive(), f"the spawned rank exited ({proc.exitcode}) before writing {count} keys"
        assert time.monotonic() < deadline, f"{len(names)} of {count} keys in the store after {WAIT_S:.0f}s"
        time.sleep(0.1)
    return names


def join_as_rank(rank: int, port: int, key: bytes) -> None:
    """A worker rank of a 2-rank gloo group on this host, as it joins through its sealed client."""
    group = init_tp_group(rank, 2, torch.device("cpu"), LOCAL_STORE_HOST, port,
                          connect_store(LOCAL_STORE_HOST, port, key))
    try:
        assert group.all_gather_object(f"rank {rank}") == ["rank 0", "rank 1"]
    finally:
        destroy_tp_group()


def spawn(rank: int, port: int, key: bytes) -> BaseProcess:
    proc = mp.get_context("spawn").Process(target=join_as_rank, args=(rank, port, key), daemon=True)
    proc.start()
    return proc


@pytest.fixture
def local_store() -> Iterator[tuple[dist.TCPStore, bytes]]:
    """Rank 0's store as a group on one host has it: loopback, with the group's fresh key."""
    yield create_store(LOCAL_STORE_HOST, None, 2), fresh_store_key()


def stop(proc: BaseProcess) -> None:
    proc.join(WAIT_S)
    if proc.is_alive():
        proc.kill()
        proc.join(WAIT_S)


@pytest.mark.timeout(180)
def test_a_raw_client_on_loopback_sees_only_macs(local_store: tuple[dist.TCPStore, bytes]) -> None:
    raw, key = local_store
    rank1 = spawn(1, raw.port, key)
    try:
        group = init_tp_group(0, 2, torch.device("cpu"), LOCAL_STORE_HOST, raw.port, SealedStore(raw, key))
        assert group.all_gather_object("rank 0") == ["rank 0", "rank 1"]
        spy = raw_client(raw.port)
        names = spy.list_keys()
        # the joining key and everything gloo wrote (both groups' addresses) went through the seal: no name
        # tells what it is
        assert names and all(SEALED_NAME.fullmatch(n) for n in names), names
        for name in names:
            body = base64.b64decode(spy.get(name), validate=True)
            assert len(body) >= NONCE_BYTES + MAC_BYTES, (name, body)
            assert LOCAL_STORE_HOST.encode() not in body and b"joining" not in body
        # the names are those of the group's key: a store opened with another key finds none of them
        assert SealedStore(spy, key).check([joining_key(1)])
        assert not SealedStore(spy, fresh_store_key()).check([joining_key(1)])
    finally:
        destroy_tp_group()
        stop(rank1)
    assert rank1.exitcode == 0


@pytest.mark.timeout(180)
def test_a_value_overwritten_by_a_local_user_stops_the_join_with_store_tampered(
        local_store: tuple[dist.TCPStore, bytes]) -> None:
    raw, key = local_store
    rank0 = spawn(0, raw.port, key)  # it opens the group, publishes its gloo address, then waits for rank 1's
    try:
        spy = raw_client(raw.port)
        # both keys (join_waits.OPEN_KEY, then the gloo address): with the open key alone rank 1 would read an
        # address left intact and join
        for name in keys_appear(spy, 2, rank0):
            spy.set(name, base64.b64encode(b"\x00" * (NONCE_BYTES + MAC_BYTES + 16)).decode())  # its own address
        spy.num_keys()  # a request on the same connection returns once the sets are applied
        with pytest.raises(StoreTampered) as caught:
            init_tp_group(1, 2, torch.device("cpu"), LOCAL_STORE_HOST, raw.port,
                          connect_store(LOCAL_STORE_HOST, raw.port, key))
    finally:
        rank0.kill()  # it waits for rank 1 until the collective timeout: nothing more to learn from it
        rank0.join(WAIT_S)
    assert caught.value.field == "parallel.master_port"
    assert "that no rank of this group wrote" in caught.value.message, caught.value.message
    assert caught.value.hint is not None and "another user's process" in caught.value.hint
    assert not dist.is_initialized()  # it left nothing half-joined behind


def test_a_backend_that_reports_the_tampered_value_as_its_own_error_still_names_it(
        local_store: tuple[dist.TCPStore, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """NCCL reads its unique id from the store in C++ and raises DistBackendError quoting what the store
    raised (ProcessGroupNCCL::broadcastUniqueNCCLID): the rank still fails with StoreTampered, not with 'could
    not join' (which sends one looking for a dead peer). A stand-in for NCCL here: no GPU."""
    raw, key = local_store
    sealed = SealedStore(raw, key)
    sealed.set("0", b"nccl unique id")  # as rank 0 publishes it
    spy = raw_client(raw.port)
    (name,) = spy.list_keys()
    sealed.set(OPEN_KEY, "1")  # rank 0 opened the group (every rank came): rank 1 goes on to the backend's join
    spy.set(name, "forged")
    spy.num_keys()

    def nccl_like_init(*args: object, **kwargs: object) -> None:
        try:
            sealed.get("0")
        except Exception as exc:  # noqa: BLE001 - as ProcessGroupNCCL catches std::exception
            raise dist.DistBackendError(f"[1] is setting up NCCL communicator ... got error: {exc}") from None

    monkeypatch.setattr(dist, "init_process_group", nccl_like_init)
    with pytest.raises(StoreTampered, match="a value for '0' that no rank of this group wrote"):
        init_tp_group(1, 2, torch.device("cpu"), LOCAL_STORE_HOST, raw.port, sealed)
