"""Joining a TP group that never forms: the error states the wait it made, and a later join works."""

from __future__ import annotations

import pytest
import torch

from pdlaunch.distributed import parallel_state
from pdlaunch.distributed.parallel_state import (
    SealedStore,
    create_store,
    destroy_tp_group,
    fresh_store_key,
    init_tp_group,
)
from pdlaunch.errors import EngineError


def test_a_group_whose_peer_never_joins_fails_stating_the_wait_then_a_new_group_forms(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel_state, "COLLECTIVE_TIMEOUT_S", 2.0)
    store = create_store("127.0.0.1", None, 2)
    with pytest.raises(EngineError, match="TP rank 0 could not join the 2-rank group .* within 2s"):
        init_tp_group(0, 2, torch.device("cpu"), "127.0.0.1", store.port, SealedStore(store, fresh_store_key()))
    # A fresh rank names the default group "0"; this process must too, or the two never meet.
    alone = create_store("127.0.0.1", None, 1)
    try:
        init_tp_group(0, 1, torch.device("cpu"), "127.0.0.1", alone.port, SealedStore(alone, fresh_store_key()))
        assert torch.distributed.distributed_c10d._get_default_group().group_name == "0"  # noqa: SLF001
    finally:
        destroy_tp_group()
