"""A dead engine is forgotten by its peers (KVConnector.forget_engine): on a prefill the decode agents it pushed
to or that READ from it, found by the decode engine id their push or listen request named (`reader`); on a decode
the prefill engine's handshakes. Nothing of another engine goes."""

from __future__ import annotations

from typing import Any

import pytest

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.decode.peers import PeerCache, RemoteEngine
from pdlaunch.kv_transfer.handshake import HandshakeInfo
from pdlaunch.kv_transfer.messages import ForgetRequest, ListenRequest
from pdlaunch.kv_transfer.prefill.decode_peers import DecodePeers
from pdlaunch.kv_transfer.remote_kv import RemoteKV
from pdlaunch.kv_transfer.side_channel.client import call
from pdlaunch.kv_transfer.side_channel.server import SideChannelServer
from tests.kv_transfer.deployment_secret import KEYS


class Agent:
    """Loads a peer under "loaded-<metadata hex>"; records what it forgot; `broken` names refuse to go."""

    name = "test-agent"

    def __init__(self, broken: frozenset[str] = frozenset()) -> None:
        self.forgotten: list[str] = []
        self.broken = broken

    def add_remote(self, metadata: bytes) -> str:
        return f"loaded-{metadata.hex()}"

    def forget_remote(self, name: str) -> None:
        if name in self.broken:
            raise RuntimeError("NIXL_ERR_NOT_FOUND")
        self.forgotten.append(name)


def _listen(agent_name: str, metadata: str, reader: str) -> ListenRequest:
    return ListenRequest(type="listen", agent_name=agent_name, agent_metadata=metadata, reader=reader)


def test_a_prefill_forgets_every_agent_of_the_dead_decode_engine_and_only_those() -> None:
    agent = Agent()
    peers = DecodePeers(agent)  # type: ignore[arg-type]
    assert peers.peer("d0-rank0", "a0", "D0") == "loaded-a0"
    peers.listen(_listen("d0-rank1", "a1", "D0"))  # another rank of D0 READs from us (resharding)
    peers.peer("d1", "b0", "D1")
    peers.peer("d0-r1", "c0", "D0-r1")  # D0 restarted: a new engine id, whose prefix is the dead one's
    assert peers.engines() == ["D0", "D0-r1", "D1"]
    assert peers.forget_engine("D0") == 2
    assert sorted(agent.forgotten) == ["loaded-a0", "loaded-a1"]
    assert peers.engines() == ["D0-r1", "D1"] and peers.names() == ["d0-r1", "d1"]
    assert peers.forget_engine("D0") == 0 and len(agent.forgotten) == 2
    assert peers.peer("d1", "b0", "D1") == "loaded-b0"  # still loaded: not loaded again, not forgotten
    assert agent.forgotten == ["loaded-a0", "loaded-a1"]


def test_an_agent_that_cannot_be_dropped_does_not_keep_the_others(caplog: pytest.LogCaptureFixture) -> None:
    agent = Agent(broken=frozenset({"loaded-a0"}))
    peers = DecodePeers(agent)  # type: ignore[arg-type]
    peers.peer("d0", "a0", "D0")
    peers.listen(_listen("d0-rank1", "a1", "D0"))
    assert peers.forget_engine("D0") == 1
    assert agent.forgotten == ["loaded-a1"] and peers.engines() == []
    assert "could not drop the metadata of decode agent loaded-a0 (engine D0): NIXL_ERR_NOT_FOUND" in caplog.text


def test_a_decode_that_slept_is_no_longer_counted_to_its_engine() -> None:
    """A sleeping decode asked us to forget its agent (ForgetRequest): its engine has nothing left here."""
    agent = Agent()
    peers = DecodePeers(agent)  # type: ignore[arg-type]
    peers.peer("d0", "a0", "D0")
    assert peers.forget(ForgetRequest(type="forget", agent_name="d0")).forgot
    assert peers.engines() == [] and peers.forget_engine("D0") == 0 and agent.forgotten == ["loaded-a0"]


def _cache(mode: str = "push") -> tuple[PeerCache, Agent]:
    agent = Agent()
    cache = PeerCache(agent, spec=lambda: None, local_device=lambda: None,  # type: ignore[arg-type]
                      transfer_mode=mode, handshake_timeout=1.0, keys=KEYS, reader="D")

    def handshake(engine_id: str, host: str, port: int, rank: int | None = None,
                  stopped: object = None) -> RemoteEngine:
        info = HandshakeInfo.model_construct(engine_id=engine_id)
        return RemoteEngine(info, f"agent-of-{engine_id}" + ("" if rank is None else f"-rank{rank}"), mode, "test",
                            (host, port + (rank or 0)))

    cache._handshake = handshake  # type: ignore[method-assign]  # no side channel in a unit test
    return cache, agent


def _remote(engine_id: str, port: int, epoch: int = 0, rank: int | None = None) -> RemoteKV:
    return RemoteKV(engine_id=engine_id, request_id=None, host="127.0.0.1", port=port, kv_epoch=epoch, tp_rank=rank)


def test_a_decode_forgets_every_entry_of_the_dead_prefill_engine_and_only_those() -> None:
    cache, agent = _cache()
    cache.get(_remote("P0", 7000, epoch=0))
    cache.get(_remote("P0", 7000, epoch=1))  # woke up once: a second entry, the same agent
    cache.get(_remote("P0", 7000, rank=1))  # a resharding load reads its rank 1 too
    cache.get(_remote("P1", 7100))
    cache.get(_remote("P0-r1", 7200))  # another engine whose id begins like the dead one's
    assert cache.forget_engine("P0") == 2
    assert sorted(agent.forgotten) == ["agent-of-P0", "agent-of-P0-rank1"]
    assert sorted(cache.snapshot()) == ["P0-r1@0", "P1@0"]
    assert cache.take_pushers() == {("127.0.0.1", 7100): "P1", ("127.0.0.1", 7200): "P0-r1"}
    assert cache.forget_engine("P0") == 0 and cache.forget_engine("nobody") == 0


@pytest.mark.parametrize("message", [
    {"type": "push", "request_id": "p-1", "nonce": "0123456789abcdef", "owner": "0123456789abcdef",
     "agent_name": "b", "agent_metadata": "00", "runs": [[[0, 3, 2]]], "base_addrs": [4096], "block_bytes": [64],
     "deadline_in": 5.0},
    {"type": "listen", "agent_name": "b", "agent_metadata": "00"},
], ids=["push", "listen"])
def test_a_push_or_listen_without_its_reader_is_refused_naming_the_fix(message: dict[str, Any]) -> None:
    """An older decode sends no reader: the prefill could never forget its agent when it dies, so it is refused."""
    server = SideChannelServer("127.0.0.1", 0, {}, KEYS)
    refused = (rf"invalid side-channel message: msg\.{message['type']}\.reader: .*reader \(the decode engine id\) is "
               r"missing: the decode runs an older pdlaunch; run the same pdlaunch version on prefill and decode")
    try:
        with pytest.raises(KVTransferError, match=refused):
            call("127.0.0.1", server.port, message, 5, "old decode", KEYS)
    finally:
        server.close()
