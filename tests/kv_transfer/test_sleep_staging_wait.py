"""A sleep refused while staging slots are in use says how long the transfers holding them may still run:
kv_transfer.transfer_timeout_seconds plus the drain's grace over NIXL (releasing a transfer cancels it), and
plus the agent's release_wait_seconds over Mooncake, whose READ or WRITE that runs keeps its slots until it
ends (at the latest at MC_TRANSFER_TIMEOUT)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.agent import KVAgent
from pdlaunch.kv_transfer.mooncake.agent import MooncakeAgent
from pdlaunch.kv_transfer.nixl_connector import NixlConnector
from pdlaunch.kv_transfer.staging import StagingArea
from tests.kv_transfer.pd_procs import make_spec


def _refusal(agent: type[Any], title: str) -> KVTransferError:
    """before_sleep of a connector over `agent` with 2 of its staging slots held by request r-1."""
    staging = StagingArea(make_spec().kv_caches, budget_bytes=1 << 20)
    staging.acquire(2, timeout=1.0)
    connector = SimpleNamespace(staging=staging, staging_users=lambda: {"r-1"}, title=title,
                                agent=SimpleNamespace(release_cancels=agent.release_cancels,
                                                      release_wait_seconds=agent.release_wait_seconds),
                                kv=SimpleNamespace(transfer_timeout_seconds=30.0))
    with pytest.raises(KVTransferError) as err:
        NixlConnector.before_sleep(cast(Any, connector))
    assert f"2 of {staging.num_slots} KV staging slots are in use by request(s) r-1" in str(err.value)
    return err.value


def test_over_nixl_the_wait_is_the_transfer_timeout_and_the_drains_grace() -> None:
    hint = _refusal(KVAgent, "NIXL").hint or ""
    assert "within 35s (kv_transfer.transfer_timeout_seconds + 5s)" in hint and "MC_TRANSFER_TIMEOUT" not in hint


def test_over_mooncake_the_wait_covers_a_transfer_that_cannot_be_cancelled() -> None:
    grace = 5 + MooncakeAgent.release_wait_seconds  # at least 60 s past MC_TRANSFER_TIMEOUT's 30 s default
    hint = _refusal(MooncakeAgent, "Mooncake").hint or ""
    assert f"within {30 + grace:g}s (kv_transfer.transfer_timeout_seconds + {grace:g}s)" in hint
    assert "Mooncake cannot cancel a READ or WRITE that runs, which keeps its slots until it ends" in hint
    assert "MC_TRANSFER_TIMEOUT" in hint
