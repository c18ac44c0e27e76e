"""A staged or resharding READ runs in the loader thread (LoadContext.read_chunk). Mooncake cannot stop a
transfer that runs (MooncakeXfer.release drops only one not started), so a READ the loader gave up
(abort, deadline) still writes into the decode's blocks or staging slots: the load must drain until it
ended, and the loader must not hand its slots back before."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.decode.context import LoadContext
from pdlaunch.kv_transfer.decode.load import Load, LoadState, LoadStrategy
from pdlaunch.kv_transfer.decode.table import LoadTable
from pdlaunch.kv_transfer.mooncake.sender import MooncakeXfer, TransferPool
from pdlaunch.kv_transfer.remote_kv import RemoteKV

WAIT_S = 30.0


class _Agent:
    """Posts each READ on a real Mooncake transfer pool; the READ runs until `finish` is set."""

    name = "decode-agent"
    device_id = 0

    def __init__(self) -> None:
        self.pool = TransferPool(0, workers=1)
        self.started, self.finish = threading.Event(), threading.Event()
        self.ended_before_return: list[bool] = []
        self.returned = threading.Event()

    def transfer(self, op: str, local: list[tuple[int, int]], remote: list[tuple[int, int]], remote_agent: str,
                 remote_device_id: int, notif: bytes) -> MooncakeXfer:
        def run() -> None:
            self.started.set()
            assert self.finish.wait(WAIT_S)
            self.ended_before_return.append(not self.returned.is_set())

        return self.pool.post(run, sum(n for _, n in local), f"{op} with {remote_agent}", wait_on_release=False)


class _Strategy(LoadStrategy):
    mode = "pull"

    def run(self, load: Load) -> None:
        raise AssertionError("not run here")

    def release_prefill(self, load: Load) -> None:
        pass


@pytest.fixture
def agent() -> Iterator[_Agent]:
    agent = _Agent()
    yield agent
    agent.finish.set()
    agent.pool.shutdown()


def test_an_aborted_loader_read_drains_until_it_ended(agent: _Agent) -> None:
    ctx = LoadContext(agent=cast(Any, agent), spec=cast(Any, None), peers=cast(Any, None), keys=cast(Any, None),
                      handshake_timeout=1.0, transfer_timeout=WAIT_S, verify_kv=False,
                      executor=cast(Any, None), reader="decode")
    table = LoadTable(ctx)
    now = time.monotonic()
    load = Load("r-1", RemoteKV(engine_id="prefill", request_id="p-1", host="127.0.0.1", port=1, block_ids=[[5]]),
                [[(0, 3, 5)]], deadline=now + WAIT_S, started=now, state=LoadState.RUNNING)
    load.strategy, load.remote_agent = _Strategy(), "prefill-agent"
    table.add(load)
    remote = SimpleNamespace(agent_name="prefill-agent", info=SimpleNamespace(staging_slots=0, base_addrs=[1 << 20],
                                                                              device=SimpleNamespace(index=0)))
    errors: list[BaseException] = []

    def loader() -> None:
        try:
            ctx.read_chunk(load, cast(Any, remote), load.remote, [[3]], [1 << 16], [[5]], [4096])
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            errors.append(e)
        finally:
            agent.returned.set()

    thread = threading.Thread(target=loader)
    thread.start()
    try:
        assert agent.started.wait(WAIT_S)
        deadline = time.monotonic() + WAIT_S
        while load.xfer is None and thread.is_alive() and time.monotonic() < deadline:  # posted, not yet listed
            time.sleep(0.001)
        assert table.abort("r-1") is True, "the decode's blocks were given back while the READ writes them"
        # The loader stops polling the READ (aborted); the slots it READs into go back once it returns.
        agent.returned.wait(2.0)
        assert table.poll_draining(time.monotonic()) == (set(), set())
        agent.finish.set()
        thread.join(WAIT_S)
        assert agent.ended_before_return == [True], "read_chunk returned while its READ still ran"
        assert len(errors) == 1 and isinstance(errors[0], KVTransferError)
        deadline = time.monotonic() + WAIT_S
        while not (safe := table.poll_draining(time.monotonic())[1]) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert safe == {"r-1"} and load.xfer is None
    finally:
        agent.finish.set()
        thread.join(WAIT_S)
