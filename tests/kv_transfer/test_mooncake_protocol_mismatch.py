"""Each Mooncake engine resolves `mooncake_protocol: auto` on its own host (rdma where the kernel lists an RDMA
device, else tcp), so a prefill and a decode of one deployment can end up on different transports, which cannot
move bytes between each other. The peer's protocol travels in its agent metadata and a mismatch is refused when
the peer is added (at the decode's handshake, or at a push request on the prefill), naming both protocols and
the setting to change. It used to be accepted: every READ or WRITE with that peer then failed with Mooncake's
bare error code."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import pytest

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.mooncake.agent import MooncakeAgent, PeerMetadata
from pdlaunch.kv_transfer.mooncake.sender import TransferPool

SECRET = "s" * 32


class _Engine:
    """What MooncakeAgent reads of its engine to describe itself."""

    def __init__(self, protocol: str, session_id: str) -> None:
        self.protocol = protocol
        self.session_id = session_id


@pytest.fixture
def pool() -> Iterator[TransferPool]:
    pool = TransferPool(0, workers=1)
    yield pool
    pool.shutdown()


def _agent(name: str, protocol: str, pool: TransferPool) -> MooncakeAgent:
    return MooncakeAgent(name, cast(Any, _Engine(protocol, f"10.0.0.{len(name)}:17000")), pool, SECRET)


def test_a_peer_on_another_mooncake_protocol_is_refused_with_the_setting_to_change(pool: TransferPool) -> None:
    decode, prefill = _agent("decode-agent", "tcp", pool), _agent("prefill-agent", "rdma", pool)
    with pytest.raises(KVTransferError) as caught:
        decode.add_remote(prefill.metadata())
    error = caught.value
    assert error.field == "kv_transfer.mooncake_protocol"
    assert "prefill-agent" in str(error) and "rdma" in str(error) and "tcp" in str(error)
    assert error.hint is not None and "mooncake_protocol" in error.hint
    with pytest.raises(KVTransferError, match="Mooncake peer .* is not known here"):
        decode.transfer("READ", [(0, 1)], [(0, 1)], "prefill-agent", 0, b"")


def test_a_peer_on_the_same_protocol_is_added(pool: TransferPool) -> None:
    decode, prefill = _agent("decode-agent", "rdma", pool), _agent("prefill-agent", "rdma", pool)
    assert decode.add_remote(prefill.metadata()) == "prefill-agent"
    assert PeerMetadata.model_validate_json(prefill.metadata()).protocol == "rdma"


def test_metadata_without_a_protocol_is_refused(pool: TransferPool) -> None:
    decode = _agent("decode-agent", "tcp", pool)
    with pytest.raises(KVTransferError, match="Mooncake metadata is not valid"):
        decode.add_remote(b'{"name": "prefill-agent", "session": "10.0.0.9:17000"}')
