"""Block selection, coalescing, side channel, checksums, compatibility and mode choice, without NIXL."""

from __future__ import annotations

import random
import socket
import time

import pytest
import torch
from pydantic import BaseModel

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer import transfer_mode
from pdlaunch.kv_transfer.blocks import BlockRun, coalesce, needed_block_indices, pair_blocks, run_descriptors
from pdlaunch.kv_transfer.checksum import block_checksums, verify_blocks
from pdlaunch.kv_transfer.handshake import DeviceInfo, HandshakeInfo, check_compatible, compat_fields, compat_hash
from pdlaunch.kv_transfer.messages import ForgetRequest, StageAnswer, UnstageRequest
from pdlaunch.kv_transfer.side_channel import client
from pdlaunch.kv_transfer.side_channel import server as side_channel_server
from pdlaunch.kv_transfer.side_channel.server import SideChannelServer
from pdlaunch.kv_transfer.staging import StagingArea
from tests.kv_transfer.deployment_secret import KEYS
from tests.kv_transfer.pd_procs import make_spec

LISTEN = {"type": "listen", "agent_name": "a", "agent_metadata": "00", "reader": "d"}  # a valid listen request


def test_needed_blocks_cover_the_loaded_positions() -> None:
    assert list(needed_block_indices(4, 0, 16, None)) == [0, 1, 2, 3]
    assert list(needed_block_indices(4, 0, 17, None)) == [0, 1, 2, 3, 4]
    assert list(needed_block_indices(4, 8, 2, None)) == [2]
    assert list(needed_block_indices(4, 0, 0, None)) == []
    # window 6, loading [0, 15): only positions >= 9 are still visible -> blocks 2, 3
    assert list(needed_block_indices(4, 0, 15, 6)) == [2, 3]


def test_pairs_skip_local_holes_and_refuse_remote_ones() -> None:
    assert pair_blocks([5, -1, 7], [1, 2, 3], range(3), 0) == [(0, 5, 1), (2, 7, 3)]
    with pytest.raises(KVTransferError, match="does not hold block 1 of group 0"):
        pair_blocks([5, 6], [1, -1], range(2), 0)


def _pairs_one_by_one(local: list[int], remote: list[int], indices: range) -> list[tuple[int, int, int]] | str:
    """What pair_blocks must give, block by block: the pairs, or the error a needed block raises first."""
    pairs = []
    for i in indices:
        if i >= len(local):
            return "decode block table"
        if local[i] < 0:
            continue
        if i >= len(remote) or remote[i] < 0:
            return "does not hold block"
        pairs.append((i, local[i], remote[i]))
    return pairs


def test_pairs_equal_a_block_by_block_walk_for_any_tables() -> None:
    """The tables' slices are zipped when no block can raise; the answer (or the error) is the walk's."""
    rng = random.Random(7)
    for _ in range(2000):
        local = [rng.choice([-1, rng.randrange(100)]) if rng.random() < 0.2 else rng.randrange(100)
                 for _ in range(rng.randrange(0, 12))]
        remote = [-1 if rng.random() < 0.1 else rng.randrange(100) for _ in range(rng.randrange(0, 12))]
        start = rng.randrange(0, 8)
        indices = range(start, start + rng.randrange(0, 8))
        expected = _pairs_one_by_one(local, remote, indices)
        if isinstance(expected, str):
            with pytest.raises(KVTransferError, match=expected):
                pair_blocks(local, remote, indices, 0)
        else:
            assert pair_blocks(local, remote, indices, 0) == expected


def test_coalesce_merges_runs_consecutive_on_both_sides() -> None:
    pairs = [(3, 5), (4, 6), (10, 7), (11, 2), (20, 9), (21, 10), (22, 11)]
    assert coalesce(pairs) == [BlockRun(3, 5, 2), BlockRun(10, 7, 1), BlockRun(11, 2, 1), BlockRun(20, 9, 3)]
    local, remote = run_descriptors(coalesce(pairs), 1000, 5000, 100)
    assert local == [(1300, 200), (2000, 100), (2100, 100), (3000, 300)]
    assert remote == [(5500, 200), (5700, 100), (5200, 100), (5900, 300)]


def test_coalesce_gives_back_every_pair_in_maximal_runs() -> None:
    import random

    rng = random.Random(0)
    for _ in range(500):
        pairs, local, remote = [], rng.randint(0, 9), rng.randint(0, 9)
        for _ in range(rng.randint(0, 30)):
            if rng.random() < 0.3:
                local, remote = rng.randint(0, 60), rng.randint(0, 60)
            pairs.append((local, remote))
            local, remote = local + 1, remote + (1 if rng.random() < 0.9 else 2)
        runs = coalesce(iter(pairs))  # any iterable, consumed once
        assert [(r.local_start + i, r.remote_start + i) for r in runs for i in range(r.count)] == pairs
        for a, b in zip(runs, runs[1:]):
            assert (b.local_start, b.remote_start) != (a.local_start + a.count, a.remote_start + a.count)
    assert coalesce([]) == []


def test_coalesced_descriptor_is_the_bytes_of_the_block_run() -> None:
    spec = make_spec(num_blocks=8)
    cache = spec.kv_caches[0]
    (run,) = coalesce([(2, 0), (3, 1), (4, 2)])
    (local,), _ = run_descriptors([run], cache.data_ptr(), 0, spec.block_bytes[0])
    assert local == (cache[2].data_ptr(), cache[2:5].numel() * cache.element_size())


def test_side_channel_round_trip_and_errors() -> None:
    class Got(BaseModel):
        got: str

    def boom(message: UnstageRequest) -> Got:
        raise KVTransferError("refused on purpose")

    def echo(message: ForgetRequest) -> Got:
        return Got(got=message.agent_name)

    server = SideChannelServer("127.0.0.1", 0, {"forget": echo, "unstage": boom}, KEYS)
    try:
        answer = client.call("127.0.0.1", server.port, {"type": "forget", "agent_name": "a"}, 5, "echo", KEYS)
        assert answer["got"] == "a"
        typed = client.request("127.0.0.1", server.port, ForgetRequest(type="forget", agent_name="b"), Got, 5,
                               "echo", KEYS)
        assert typed == Got(got="b")
        with pytest.raises(KVTransferError, match="does not fit"):
            client.request("127.0.0.1", server.port, ForgetRequest(type="forget", agent_name="b"),
                           StageAnswer, 5, "echo", KEYS)
        with pytest.raises(KVTransferError, match="refused on purpose"):
            client.call("127.0.0.1", server.port, {"type": "unstage", "ticket": "t"}, 5, "boom", KEYS)
        with pytest.raises(KVTransferError, match="is not served here"):
            client.call("127.0.0.1", server.port, LISTEN, 5, "listen", KEYS)
        with pytest.raises(KVTransferError, match=r"invalid side-channel message: msg: .*'nope'"):
            client.call("127.0.0.1", server.port, {"type": "nope"}, 5, "nope", KEYS)
    finally:
        server.close()


def test_side_channel_kept_connections_are_reused_and_replaced_when_closed(monkeypatch) -> None:
    class Got(BaseModel):
        got: str

    def echo(message: ForgetRequest) -> Got:
        return Got(got=message.agent_name)

    def ask(name: str) -> str:
        return client.call("127.0.0.1", server.port, {"type": "forget", "agent_name": name}, 5, "echo", KEYS,
                           connections)["got"]

    def wait_connections(n: int) -> None:
        deadline = time.monotonic() + 30
        while server.num_connections() != n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.num_connections() == n, f"{server.num_connections()} side-channel connections, not {n}"

    server = SideChannelServer("127.0.0.1", 0, {"forget": echo}, KEYS)
    connections = client.Connections(per_peer=2)
    try:
        assert [ask(str(i)) for i in range(5)] == ["0", "1", "2", "3", "4"]
        wait_connections(1)  # one connection served all five
        with pytest.raises(KVTransferError, match="is not served here"):  # an error answer keeps it too
            client.call("127.0.0.1", server.port, LISTEN, 5, "listen", KEYS, connections)
        wait_connections(1)
        # The server closes a connection left idle (quietly); a kept one it closed is replaced, even when
        # the client still thinks it fresh.
        monkeypatch.setattr(side_channel_server, "FRAME_READ_SECONDS", 0.2)
        assert ask("a") == "a"  # the server thread now waits at most 0.2s for the next frame
        wait_connections(0)
        monkeypatch.setattr(client, "POOL_IDLE_SECONDS", 60.0)
        assert ask("b") == "b"
        server.close()  # ends the connection kept from the last call too
        wait_connections(0)
        with pytest.raises(KVTransferError, match="no answer"):
            client.call("127.0.0.1", server.port, {"type": "forget", "agent_name": "c"}, 1, "echo", KEYS,
                        connections)
    finally:
        connections.close()
        server.close()
    assert connections.take("127.0.0.1", server.port) is None


def test_side_channel_silent_peer_times_out_with_what_was_awaited() -> None:
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        with pytest.raises(KVTransferError, match=r"KV handshake with prefill engine E: no answer .* within 0.3s"):
            client.call("127.0.0.1", port, {"type": "handshake"}, 0.3, "KV handshake with prefill engine E", KEYS)


def test_block_checksums_detect_one_changed_value() -> None:
    cache = make_spec(num_blocks=4).kv_caches[0]
    sums = block_checksums(cache, [0, 2, -1])
    assert sums[2] == "" and len(set(sums[:2])) == 2
    verify_blocks(cache, 0, [0, 2], sums[:2], "r")
    cache[2].view(-1)[5] += 1
    with pytest.raises(KVTransferError, match="local block 2"):
        verify_blocks(cache, 0, [0, 2], sums[:2], "r")


def _info(spec, **overrides) -> HandshakeInfo:
    fields = compat_fields(spec)
    values = dict(engine_id="P", agent_name="a", agent_metadata="", base_addrs=[0], block_bytes=spec.block_bytes,
                  num_blocks=spec.num_blocks, block_size=spec.block_size, dtype=fields["dtype"],
                  kv_layout=fields["kv_layout"], num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                  group_layers=spec.group_layers, model_name=spec.model_name, tp_size=1, tp_rank=0,
                  device=DeviceInfo(type="cpu"), compat_hash=compat_hash(fields))
    values.update(overrides)
    if overrides:
        values["compat_hash"] = "different"
    return HandshakeInfo(**values)


@pytest.mark.parametrize(
    "field, value, config_key",
    [("dtype", "bfloat16", "model.dtype"), ("model_name", "other", "model.path"),
     ("num_kv_heads", 4, "parallel.tp"), ("kv_layout", "layer_major", "kv_layout")],
)
def test_compatibility_check_names_the_differing_field(field: str, value: object, config_key: str) -> None:
    spec = make_spec()
    check_compatible(spec, _info(spec))
    with pytest.raises(KVTransferError) as err:
        check_compatible(spec, _info(spec, **{field: value}))
    assert f"{field} differs (prefill engine P: {value!r}" in str(err.value)
    assert err.value.field == config_key and err.value.hint


def test_auto_mode_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = DeviceInfo(type="cpu", host_id="h")
    assert transfer_mode.resolve_transfer_mode("auto", cpu, cpu)[0] == "pull"
    assert transfer_mode.resolve_transfer_mode("push", cpu, cpu) == ("push", "kv_transfer.transfer_mode is push")
    gpu0 = DeviceInfo(type="cuda", index=0, pci_bus_id="00000000:1b:00.0", host_id="h")
    gpu1 = DeviceInfo(type="cuda", index=1, pci_bus_id="00000000:2c:00.0", host_id="h")
    mode, reason = transfer_mode.resolve_transfer_mode("auto", gpu0, gpu0)
    assert mode == "push" and "share GPU" in reason
    monkeypatch.setattr(transfer_mode, "nvlink_between", lambda a, b: True)
    assert transfer_mode.resolve_transfer_mode("auto", gpu0, gpu1)[0] == "pull"
    monkeypatch.setattr(transfer_mode, "nvlink_between", lambda a, b: False)
    mode, reason = transfer_mode.resolve_transfer_mode("auto", gpu0, gpu1)
    assert mode == "push" and "no NVLink" in reason
    other_host = gpu1.model_copy(update={"host_id": "elsewhere"})
    assert transfer_mode.resolve_transfer_mode("auto", gpu0, other_host)[0] == "push"


def test_staging_slots_prefer_runs_and_round_trip_blocks() -> None:
    spec = make_spec(num_blocks=10, groups=2, seed=3)
    staging = StagingArea(spec.kv_caches, budget_bytes=5 * sum(spec.block_bytes))
    assert staging.num_slots == 5
    first = staging.acquire(2, timeout=1)
    second = staging.acquire(2, timeout=1)
    staging.release(first)
    assert staging.acquire(3, timeout=1) == [0, 1, 4]  # no free run of 3: any 3
    with pytest.raises(KVTransferError, match="no 2 free KV staging slots within 0.05s"):
        staging.acquire(2, timeout=0.05)
    staging.release(second + [0, 1, 4])
    slots = staging.acquire(3, timeout=1)
    target = make_spec(num_blocks=10, groups=2, seed=4)
    staging.gather(spec.kv_caches, [[7, 2, 5], [1]], slots)
    staging.scatter(target.kv_caches, [[0, 1, 9], [3]], slots)
    assert torch.equal(target.kv_caches[0][[0, 1, 9]], spec.kv_caches[0][[7, 2, 5]])
    assert torch.equal(target.kv_caches[1][3], spec.kv_caches[1][1])
