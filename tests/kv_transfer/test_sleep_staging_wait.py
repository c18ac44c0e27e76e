"""A sleep refused while staging slots are in use says how long the transfers holding them may still run:
kv_transfer.transfer_timeout_seconds plus the drain's grace over NIXL (releasing a transfer cancels it), and
plus the agent's release_wait_seconds over Mooncake, whose READ or WRITE that runs keeps its slots until it
ends (at the latest at MC_TRANSFER_TIMEOUT, plus 1 s per GB it moves: at most the bytes of the slots in use)."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, cast

import pytest

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.agent import KVAgent
from pdlaunch.kv_transfer.mooncake.agent import MooncakeAgent
from pdlaunch.kv_transfer.nixl_connector import NixlConnector, staging_wait_hint
from pdlaunch.kv_transfer.staging import StagingArea
from tests.kv_transfer.pd_procs import make_spec


def _agent(agent: type[Any]) -> SimpleNamespace:
    return SimpleNamespace(release_cancels=agent.release_cancels, release_wait_seconds=agent.release_wait_seconds,
                           release_wait_seconds_per_byte=agent.release_wait_seconds_per_byte)


def _refusal(agent: type[Any], title: str) -> tuple[KVTransferError, int]:
    """before_sleep of a connector over `agent` with 2 of its staging slots held by request r-1; the error and
    the bytes of those 2 slots."""
    staging = StagingArea(make_spec().kv_caches, budget_bytes=1 << 20)
    staging.acquire(2, timeout=1.0)
    connector = SimpleNamespace(staging=staging, staging_users=lambda: {"r-1"}, title=title, agent=_agent(agent),
                                kv=SimpleNamespace(transfer_timeout_seconds=30.0))
    with pytest.raises(KVTransferError) as err:
        NixlConnector.before_sleep(cast(Any, connector))
    assert f"2 of {staging.num_slots} KV staging slots are in use by request(s) r-1" in str(err.value)
    return err.value, 2 * staging.nbytes // staging.num_slots


def test_over_nixl_the_wait_is_the_transfer_timeout_and_the_drains_grace() -> None:
    hint = _refusal(KVAgent, "NIXL")[0].hint or ""
    assert "within 35s (kv_transfer.transfer_timeout_seconds + 5s)" in hint and "MC_TRANSFER_TIMEOUT" not in hint


def test_over_mooncake_the_wait_covers_a_transfer_that_cannot_be_cancelled() -> None:
    error, num_bytes = _refusal(MooncakeAgent, "Mooncake")
    hint = error.hint or ""
    # at least 60 s past MC_TRANSFER_TIMEOUT's 30 s default, and a second per GB of the 2 slots (rounded up)
    grace = math.ceil(5 + MooncakeAgent.release_wait_seconds + num_bytes * 1e-9)
    assert f"within {30 + grace:g}s (kv_transfer.transfer_timeout_seconds + {grace:g}s)" in hint
    assert "Mooncake cannot cancel a READ or WRITE that runs, which keeps its slots until it ends" in hint
    assert "MC_TRANSFER_TIMEOUT" in hint
    assert f"plus 1 s per GB the transfer moves, here at most the {num_bytes / 1e9:.2g} GB of the slots in use" in hint


def test_over_mooncake_the_wait_grows_with_the_bytes_of_the_slots_in_use() -> None:
    """Mooncake's own timeout is MC_TRANSFER_TIMEOUT plus a nanosecond a byte: 20 GB of slots in use (a large
    staging buffer) may keep them 20 s past it."""
    hint = staging_wait_hint(cast(Any, _agent(MooncakeAgent)), 30.0, "Mooncake", 20 * 10**9)
    grace = 5 + MooncakeAgent.release_wait_seconds + 20
    assert f"within {30 + grace:g}s (kv_transfer.transfer_timeout_seconds + {grace:g}s)" in hint, hint
    assert "plus 1 s per GB the transfer moves, here at most the 20 GB of the slots in use" in hint, hint
    nixl = staging_wait_hint(cast(Any, _agent(KVAgent)), 30.0, "NIXL", 20 * 10**9)  # release cancels: no wait
    assert "within 35s (kv_transfer.transfer_timeout_seconds + 5s)" in nixl and "GB" not in nixl, nixl
