"""PeerCache: which prefill metadata a decode drops when a prefill says it goes to sleep."""

from __future__ import annotations

from pdlaunch.kv_transfer.decode.peers import PeerCache, RemoteEngine
from pdlaunch.kv_transfer.handshake import HandshakeInfo
from pdlaunch.kv_transfer.remote_kv import RemoteKV
from tests.kv_transfer.deployment_secret import KEYS


class RecordingAgent:
    name = "decode-agent"

    def __init__(self) -> None:
        self.forgotten: list[str] = []

    def forget_remote(self, name: str) -> None:
        self.forgotten.append(name)


def _cache(mode: str) -> tuple[PeerCache, RecordingAgent, list[int]]:
    agent = RecordingAgent()
    cache = PeerCache(agent, spec=lambda: None, local_device=lambda: None,  # type: ignore[arg-type]
                      transfer_mode=mode, handshake_timeout=1.0, keys=KEYS, reader="decode-engine")
    handshakes: list[int] = []

    def handshake(engine_id: str, host: str, port: int, rank: int | None = None,
                  stopped: object = None) -> RemoteEngine:
        handshakes.append(port)
        info = HandshakeInfo.model_construct(engine_id=engine_id)
        agent_name = "prefill-agent" if engine_id == "P" else f"agent-of-{engine_id}"
        return RemoteEngine(info, agent_name, mode, "test", (host, port))

    cache._handshake = handshake  # type: ignore[method-assign]  # no side channel in a unit test
    return cache, agent, handshakes


def _params(epoch: int, engine_id: str = "P") -> RemoteKV:
    return RemoteKV(engine_id=engine_id, request_id=None, host="127.0.0.1", port=7000, kv_epoch=epoch)


def test_a_late_forget_leaves_the_woken_engines_metadata_alone() -> None:
    """The prefill slept at epoch 0 and woke (epoch 1); our handshake with epoch 1 came before its
    epoch-0 notification was read: only the epoch-0 entry goes, and NIXL keeps the loaded agent."""
    cache, agent, handshakes = _cache("pull")
    cache.get(_params(0))
    cache.get(_params(1))
    cache.forget_agent("prefill-agent", 0)
    assert list(cache.snapshot()) == ["P@1"] and agent.forgotten == []
    cache.get(_params(1))
    assert len(handshakes) == 2, "the epoch-1 entry should still be cached"
    cache.forget_agent("prefill-agent", 1)
    assert cache.snapshot() == {} and agent.forgotten == ["prefill-agent"]


def test_forget_without_an_epoch_drops_every_entry_of_the_agent() -> None:
    cache, agent, _ = _cache("pull")
    cache.get(_params(0))
    cache.get(_params(1))
    cache.forget_agent("prefill-agent")
    assert cache.snapshot() == {} and agent.forgotten == ["prefill-agent"]


def test_pushers_outlive_the_peer_cache_until_taken() -> None:
    """A prefill we handed memory to for a push stays on the list to ask at our sleep, even after it
    slept first and left the peer cache; pull peers never hold our memory and are not listed."""
    cache, _, _ = _cache("push")
    cache.get(_params(0))
    cache.forget_agent("prefill-agent", 0)
    assert cache.snapshot() == {}
    assert cache.take_pushers() == {("127.0.0.1", 7000): "P"}
    assert cache.take_pushers() == {}
    pull, _, _ = _cache("pull")
    pull.get(_params(0))
    assert pull.take_pushers() == {}


def test_a_restarted_prefill_at_the_same_address_replaces_the_old_one() -> None:
    """A prefill restarted at the same side-channel address with a new engine_id: the old engine's
    entry and its NIXL agent go, the new one is used; engine_ids are not fixed for a deployment's life."""
    cache, agent, handshakes = _cache("pull")
    old = cache.get(_params(0, "P-old"))
    new = cache.get(_params(0, "P-new"))
    assert old.agent_name == "agent-of-P-old" and new.agent_name == "agent-of-P-new"
    assert list(cache.snapshot()) == ["P-new@0"]
    assert agent.forgotten == ["agent-of-P-old"]
    assert cache.get(_params(0, "P-new")) is new and len(handshakes) == 2
