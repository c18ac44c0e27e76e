"""The TP group of one instance: rendezvous, backends, and the small collectives the engine needs.

Rank 0 (the engine process) hosts the rendezvous store. With no configured port it binds port 0,
so the OS picks a free one and two instances can never collide; the port is then handed to the
worker processes it spawns. The model's collectives run on the default group (gloo on CPU, NCCL on
CUDA); a gloo group beside it carries host-side values (block counts, engine_id) on both.

The store is a TCPStore: anyone who reaches its port may list, read and write its keys (torch has no
authentication, and `list_keys` shows every key, so a secret key prefix hides nothing). On one host that
is every local user of a shared machine, loopback or not. So it listens only on the address its ranks
dial (TCPStore alone would listen on every interface): loopback when the group is on one host, rank 0's
node address when it spans nodes or runs under Ray. And every rank, whatever the host, uses it only
through a SealedStore: key names are MACs, values are encrypted and MACed, and a value that fails its
MAC stops the rank (StoreTampered). Its key is fresh for a group on one host (rank 0 hands it to the
workers it spawns, never through the store or the command line: fresh_store_key); a group whose ranks
start elsewhere (other nodes, Ray actors) derives it from the deployment secret on every rank
(store_key). torch and its backends read the store only through that wrapper (the joining keys, gloo's
addresses, NCCL's unique id, rank 0's link address), so no one reads it raw.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, overload

import torch
import torch.distributed as dist

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.config.topology_config import DEFAULT_RENDEZVOUS_TIMEOUT_S
from pdlaunch.distributed.join_waits import OPEN_KEY, joining_key, wait_for_open
from pdlaunch.distributed.placement import link_authkey
from pdlaunch.distributed.rendezvous_failure import STORE_HINT, join_failed, store_unreached
from pdlaunch.errors import EngineError

log = logging.getLogger(__name__)

STORE_TIMEOUT_S = 120.0  # a blocking read of the store, once every rank came (rank 0's own, a rank's for its peers')
READY_WAIT_S = 120.0  # after rank 0 built its shard, for each other rank's Ready (the ranks load in lockstep)
COLLECTIVE_TIMEOUT_S = 60.0  # a collective that waits longer on a peer fails instead of hanging
LOAD_WAIT_S = 900.0  # how far apart the ranks may finish loading their weights (TPGroup.loaded)
LOCAL_STORE_HOST = "127.0.0.1"  # where the store of a group on one host listens (and its ranks dial)
STORE_PURPOSE = b"pdlaunch tp rendezvous store v1"
NONCE_BYTES = 16
MAC_BYTES = 32  # SHA-256


@dataclass
class TPGroup:
    """This process's place in its instance's TP group."""

    rank: int
    size: int
    backend: str  # "gloo" | "nccl"
    cpu_group: Any  # gloo group for host-side values
    store: SealedStore  # the groups hold it in C++: a Python store must outlive them

    def min_int(self, value: int) -> int:
        """The minimum of `value` over every rank."""
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())

    def loaded(self, timeout_s: float = LOAD_WAIT_S) -> None:
        """Wait until every rank loaded its weights (a gloo barrier with its own, longer timeout), so that the
        first collective after loading (the profiling forward's, or the KV block count's) never waits on a rank
        still loading: a node reading a cold disk can be minutes behind, past COLLECTIVE_TIMEOUT_S. EngineError
        naming what it waited for when the ranks do not all come within `timeout_s`."""
        try:
            dist.monitored_barrier(group=self.cpu_group, timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
        except RuntimeError as exc:
            raise EngineError(f"TP rank {self.rank}: the {self.size} ranks did not all load their weights within "
                              f"{timeout_s:.0f}s of each other: {(str(exc) or type(exc).__name__).splitlines()[0]}",
                              field="parallel.tp",
                              hint="see the log of the rank named: a slow disk, or a rank that failed while "
                                   "loading") from None

    def all_gather_object(self, value: Any) -> list[Any]:
        """`value` of every rank, in rank order."""
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, value, group=self.cpu_group)
        return out


def create_store(host: str, port: int | None, world_size: int) -> dist.TCPStore:
    """Rank 0's rendezvous store, listening on `host` only; port None or 0 lets the OS choose a free port
    (read `store.port`)."""
    try:
        listener = socket.create_server((host, port or 0), family=_family(host))
        # the store owns the listening socket from here (and closes it when it goes)
        return dist.TCPStore(host, listener.getsockname()[1], world_size, is_master=True,
                             timeout=timedelta(seconds=STORE_TIMEOUT_S), wait_for_workers=False,
                             master_listen_fd=listener.detach())
    except (RuntimeError, OSError) as exc:
        raise EngineError(f"cannot open the TP rendezvous at {host}:{port or 0}: {exc}", field="parallel.master_port",
                          hint="pick a free port (or leave parallel.master_port unset) and check parallel.master_addr"
                          ) from exc


def _family(host: str) -> socket.AddressFamily:
    try:
        return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]
    except OSError:  # create_server then names the unresolvable host
        return socket.AF_INET


def store_key(config: DeploymentConfig, instance: InstanceSpec | None, port: int) -> bytes:
    """The key of the group's SealedStore: the rank link's (placement.link_authkey, which mixes in the deployment
    secret), for another purpose; every rank of the group derives the same from its config."""
    link = link_authkey(config, instance.name if instance is not None else "engine", port)
    return hmac.new(link, STORE_PURPOSE, hashlib.sha256).digest()


def fresh_store_key() -> bytes:
    """The key of the SealedStore of a group on one host: random, so no one outside this process and the
    workers it hands it to can derive it (the deployment secret may be unset, e.g. under the offline LLM)."""
    return secrets.token_bytes(MAC_BYTES)


def connect_store(host: str, port: int, key: bytes) -> SealedStore:
    """A rank's client of rank 0's store at host:port, sealed with `key`. Rank 0 opened its store before it started
    or called this rank, so connecting does not wait (EngineError when it fails, saying whether it timed out:
    rendezvous_failure.py); STORE_TIMEOUT_S bounds each blocking read (NCCL's unique id, once the group is open).
    The wait for the open itself passes its own timeout (join_waits.wait_for_open), so
    parallel.rendezvous_timeout_seconds, which may be days, never becomes the bound of every read."""
    started = time.monotonic()
    try:
        client = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=STORE_TIMEOUT_S))
    except (RuntimeError, dist.DistError) as exc:
        raise store_unreached(f"{host}:{port}", exc, time.monotonic() - started, STORE_TIMEOUT_S,
                              "parallel.master_port", STORE_HINT) from exc
    return SealedStore(client, key)


class StoreTampered(EngineError):
    """A value in the rendezvous store that the group did not write (a process without the key wrote it)."""


class SealedStore(dist.Store):
    """`inner` as only holders of `key` can use it: each key is stored under its MAC (a peer listing the
    store learns nothing, and cannot name a key before a rank set it), each value encrypted (HMAC-SHA256
    in counter mode, a fresh nonce each) and MACed with its name. A value that fails its MAC raises
    StoreTampered, and is kept in `tampered`: NCCL reads the store from C++ and reports what it raised as its
    own error (DistBackendError), so init_tp_group raises this one instead. A counter (`add`) is hidden by name
    only."""

    def __init__(self, inner: dist.Store, key: bytes) -> None:
        super().__init__()
        self.inner = inner
        self.tampered: StoreTampered | None = None
        self._name_key, self._pad_key, self._mac_key = (
            hmac.new(key, purpose, hashlib.sha256).digest() for purpose in (b"names", b"pad", b"mac"))

    def _name(self, key: str) -> str:
        return "pdlaunch/" + hmac.new(self._name_key, key.encode(), hashlib.sha256).hexdigest()

    def _pad(self, nonce: bytes, size: int) -> bytes:
        blocks = (hmac.new(self._pad_key, nonce + i.to_bytes(8, "big"), hashlib.sha256).digest()
                  for i in range(-(-size // MAC_BYTES)))
        return b"".join(blocks)[:size]

    def _seal(self, name: str, value: bytes) -> str:
        nonce = secrets.token_bytes(NONCE_BYTES)
        body = nonce + bytes(a ^ b for a, b in zip(value, self._pad(nonce, len(value)), strict=True))
        tag = hmac.new(self._mac_key, name.encode() + body, hashlib.sha256).digest()
        return base64.b64encode(body + tag).decode()

    def _open(self, key: str, name: str, sealed: bytes) -> bytes:
        try:
            raw = base64.b64decode(sealed, validate=True)
        except ValueError:
            raw = b""
        body, tag = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
        expected = hmac.new(self._mac_key, name.encode() + body, hashlib.sha256).digest()
        if len(body) < NONCE_BYTES or not hmac.compare_digest(tag, expected):
            self.tampered = StoreTampered(
                f"the TP rendezvous store holds a value for {key!r} that no rank of this group wrote (another "
                "process reached the store's port)", field="parallel.master_port",
                hint="a process without the group's key wrote into it: on one host another user's process (the "
                "store listens on loopback, which every local user reaches), across nodes keep "
                "parallel.master_port on a private network")
            raise self.tampered
        nonce, cipher = body[:NONCE_BYTES], body[NONCE_BYTES:]
        return bytes(a ^ b for a, b in zip(cipher, self._pad(nonce, len(cipher)), strict=True))

    def set(self, key: str, value: str | bytes) -> None:
        name = self._name(key)
        self.inner.set(name, self._seal(name, value.encode() if isinstance(value, str) else bytes(value)))

    def get(self, key: str) -> bytes:
        name = self._name(key)
        return self._open(key, name, self.inner.get(name))

    def add(self, key: str, value: int) -> int:
        return self.inner.add(self._name(key), value)

    def check(self, keys: list[str]) -> bool:
        return self.inner.check([self._name(k) for k in keys])

    def delete_key(self, key: str) -> bool:
        return self.inner.delete_key(self._name(key))

    @overload
    def wait(self, keys: list[str]) -> None: ...

    @overload
    def wait(self, keys: list[str], timeout: timedelta) -> None: ...

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        names = [self._name(k) for k in keys]
        if timeout is None:
            self.inner.wait(names)
        else:
            self.inner.wait(names, timeout)


def init_tp_group(rank: int, size: int, device: torch.device, host: str, port: int, store: SealedStore,
                  rendezvous_timeout_s: float = DEFAULT_RENDEZVOUS_TIMEOUT_S) -> TPGroup:
    """Join the instance's TP group through `store` (rank 0's, at host:port, sealed: torch and its backends read
    it only through that). Rank 0 comes once every other rank came (join_waits.wait_for_joins) and opens the group;
    another rank waits for that (wait_for_open, twice `rendezvous_timeout_s` at most, parallel.rendezvous_timeout_
    seconds), so torch's own join, which waits only COLLECTIVE_TIMEOUT_S, never waits on a late rank."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = device
    started = time.monotonic()
    try:
        if rank > 0:
            store.set(joining_key(rank), "1")
            wait_for_open(store, rank, size, f"{host}:{port}", rendezvous_timeout_s)
        else:
            store.set(OPEN_KEY, "1")
        started = time.monotonic()  # torch's join begins: it waits COLLECTIVE_TIMEOUT_S for the peers
        dist.init_process_group(backend, store=store, rank=rank, world_size=size,
                                timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S), **kwargs)
        cpu_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    except (RuntimeError, dist.DistError, StoreTampered) as exc:
        if dist.is_initialized():
            destroy_tp_group()
        else:
            # The failed init drew the default group's name ("0", "1", ...) from a process-wide counter
            # that only destroying a group resets: a restart here would rendezvous under "1" while its
            # fresh worker ranks wait under "0".
            dist.distributed_c10d._world.group_count = 0
        tampered = getattr(store, "tampered", None)  # NCCL reports it as its own error
        if tampered is exc:
            raise
        if isinstance(tampered, StoreTampered):
            raise tampered from exc
        # init_process_group waits for the peers with the group's timeout, not the store's; a failure that came
        # sooner (rank 0's store gone: its port closed) says so, not that timeout
        raise join_failed(rank, size, f"{host}:{port}", exc, time.monotonic() - started, COLLECTIVE_TIMEOUT_S) from exc
    log.info("TP rank %d/%d joined (%s, rendezvous %s:%d)", rank, size, backend, host, port)
    return TPGroup(rank=rank, size=size, backend=backend, cpu_group=cpu_group, store=store)


def destroy_tp_group() -> None:
    """Leave the group (idempotent); NCCL resources must go before the process exits cleanly."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except (RuntimeError, ValueError) as exc:
            log.warning("destroying the TP group failed: %s", exc)
