"""The TP rendezvous store (a torch TCPStore) has no authentication, and any client may list its keys. A group on
one host keeps it off the network (it listens on loopback only); every group seals it, and a group whose store
other hosts reach with a key derived from the deployment secret, so a process without the secret can neither read
the group's ids (gloo addresses, the NCCL unique id, rank 0's link) nor write a value a rank would take. The
sealed store on one host: test_sealed_local_store.py and tests/tp/test_local_store_sealed.py."""

from __future__ import annotations

import multiprocessing as mp
import socket
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.distributed.parallel_state import (
    SealedStore,
    StoreTampered,
    connect_store,
    create_store,
    destroy_tp_group,
    init_tp_group,
    store_key,
)
from pdlaunch.distributed.placement import interface_addresses
from pdlaunch.distributed.rank_listener import LISTENER_KEY
from pdlaunch.distributed.tp_executor import TPExecutor
from pdlaunch.engine.llm import build_config
from pdlaunch.engine.llm_engine import LLMEngine
from tests.kv_transfer.deployment_secret import secured

LISTENER = b"10.1.2.3:40000"  # what rank 0 publishes for its remote ranks


def non_loopback_addresses() -> list[str]:
    """This machine's IPv4 addresses other than 127/8 (where another host would reach it)."""
    return [a for a in interface_addresses().values() if not a.startswith("127.")]


def reachable(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), timeout=5.0).close()
    except OSError:
        return False
    return True


def outsider(port: int) -> dist.TCPStore:
    """A client that knows the port and nothing else. It connects within a generous timeout (a loaded 2-core
    machine: 1 s failed CI), then waits 1 s at most for a key that is not there."""
    client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    client.set_timeout(timedelta(seconds=1))
    return client


def settled(store: dist.Store) -> None:
    """A set gets no answer: a request on the same connection returns once the store has applied it (another
    client's request may otherwise overtake it)."""
    store.num_keys()


def config(secret: str) -> DeploymentConfig:
    return DeploymentConfig.model_validate({"device": "cpu", "instances": [{"role": "colocated"}],
                                            "model": {"path": "tiny"}, "security": {"deployment_secret": secret}})


SPEC = InstanceSpec(role="prefill", port=8100, tp=2, engine_id="e")


@pytest.fixture
def store() -> Iterator[dist.TCPStore]:
    yield create_store("127.0.0.1", None, 2)


def test_a_local_store_is_not_reachable_from_another_address(store: dist.TCPStore) -> None:
    addresses = non_loopback_addresses()
    if not addresses:
        pytest.skip("this machine has no address but loopback")
    assert reachable("127.0.0.1", store.port)
    # TCPStore alone listens on every interface whatever host it is given
    assert not any(reachable(a, store.port) for a in addresses), f"the store answers on {addresses}"


def test_an_outsider_can_neither_find_nor_read_the_groups_keys(store: dist.TCPStore) -> None:
    sealed = SealedStore(store, store_key(config("s" * 32), SPEC, store.port))
    sealed.set(LISTENER_KEY, LISTENER)
    sealed.set("0//cpu//0/0", b"\x00gloo address\xff")
    settled(store)
    spy = outsider(store.port)
    names = spy.list_keys()
    assert len(names) == 2 and not any("listener" in n or "cpu" in n for n in names), names
    assert not any(LISTENER in spy.get(n) or b"gloo address" in spy.get(n) for n in names)
    with pytest.raises(dist.DistStoreError):  # under its own name, the key is not there
        spy.get(LISTENER_KEY)
    # a rank of the group (its own config copy) reads them; a store of another deployment secret does not
    member = SealedStore(outsider(store.port), store_key(config("s" * 32), SPEC, store.port))
    assert member.get(LISTENER_KEY) == LISTENER
    stranger = SealedStore(outsider(store.port), store_key(config("t" * 32), SPEC, store.port))
    assert not stranger.check([LISTENER_KEY])


def test_a_value_an_outsider_wrote_is_refused_naming_it(store: dist.TCPStore) -> None:
    sealed = SealedStore(store, store_key(config("s" * 32), SPEC, store.port))
    spy = outsider(store.port)
    sealed.set(LISTENER_KEY, LISTENER)
    settled(store)
    (listener_name,) = spy.list_keys()  # seen once a rank set it
    sealed.set("0//cpu//0/0", b"gloo address")
    settled(store)
    (gloo_name,) = set(spy.list_keys()) - {listener_name}
    spy.set(listener_name, spy.get(gloo_name).decode())  # a sealed value moved to another key
    settled(spy)
    with pytest.raises(StoreTampered, match=f"a value for '{LISTENER_KEY}' that no rank of this group wrote"):
        sealed.get(LISTENER_KEY)
    spy.set(listener_name, "10.9.9.9:1")  # the attacker's own address
    settled(spy)
    with pytest.raises(StoreTampered) as caught:
        sealed.get(LISTENER_KEY)
    assert caught.value.field == "parallel.master_port" and "private network" in (caught.value.hint or "")


def join_as_rank_1(host: str, port: int, key: bytes) -> None:
    """Rank 1 of a 2-rank gloo group whose store is at host:port (a rank on another node)."""
    group = init_tp_group(1, 2, torch.device("cpu"), host, port, connect_store(host, port, key))
    try:
        assert group.all_gather_object("rank 1") == ["rank 0", "rank 1"]
    finally:
        destroy_tp_group()


@pytest.mark.timeout(120)
def test_a_group_forms_through_a_sealed_store_an_outsider_cannot_read() -> None:
    addresses = non_loopback_addresses()
    if not addresses:
        pytest.skip("this machine has no address but loopback")
    host = addresses[0]
    raw = create_store(host, None, 2)
    key = store_key(config("s" * 32), SPEC, raw.port)
    rank1 = mp.get_context("spawn").Process(target=join_as_rank_1, args=(host, raw.port, key))
    rank1.start()
    try:
        group = init_tp_group(0, 2, torch.device("cpu"), host, raw.port, SealedStore(raw, key))
        assert group.all_gather_object("rank 0") == ["rank 0", "rank 1"]
        spy = dist.TCPStore(host, raw.port, is_master=False, timeout=timedelta(seconds=5))
        names = spy.list_keys()
        assert names and all(n.startswith("pdlaunch/") and "/" not in n.removeprefix("pdlaunch/") for n in names)
    finally:
        destroy_tp_group()
        rank1.join(60)
        if rank1.is_alive():
            rank1.kill()
    assert rank1.exitcode == 0


@pytest.mark.slow
def test_a_tp_group_on_one_host_keeps_its_store_on_loopback(llama_ckpt: Path) -> None:
    """End to end: a TP-2 engine (rank 0 here, rank 1 a worker process) formed its group through its store, which
    no other address reaches (sealed all the same: tests/tp/test_local_store_sealed.py)."""
    addresses = non_loopback_addresses()
    if not addresses:
        pytest.skip("this machine has no address but loopback")
    engine_config = secured(build_config(str(llama_ckpt), "cpu", "float32", {"block_size": 8, "num_gpu_blocks": 64}))
    engine_config.parallel.tp = 2
    engine = LLMEngine(engine_config, None)
    try:
        executor = engine.executor
        assert isinstance(executor, TPExecutor)
        store = executor._store  # noqa: SLF001
        port = store.inner.port
        assert reachable("127.0.0.1", port)
        assert not any(reachable(a, port) for a in addresses), f"the store answers on {addresses}"
    finally:
        engine.shutdown()


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_an_nccl_group_forms_and_runs_through_a_sealed_store() -> None:
    """A group spanning nodes on GPUs joins NCCL through a SealedStore: NCCL's ids go through the Python store
    (torch's trampoline, its C++ threads included). Rank 0 alone here (one GPU)."""
    raw = create_store("127.0.0.1", None, 1)
    sealed = SealedStore(raw, store_key(config("s" * 32), SPEC, raw.port))
    group = init_tp_group(0, 1, torch.device("cuda:0"), "127.0.0.1", raw.port, sealed)
    try:
        assert group.backend == "nccl"
        x = torch.ones(4, device="cuda:0")
        dist.all_reduce(x)
        torch.cuda.synchronize()
        assert x.tolist() == [1.0] * 4
        assert group.all_gather_object("rank 0") == ["rank 0"]
        names = raw.list_keys()
        assert names and all(n.startswith("pdlaunch/") for n in names)
    finally:
        destroy_tp_group()
