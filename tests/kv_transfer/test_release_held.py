"""A prefill frees the KV it holds for a request at once when told the decode leg will not run."""

from __future__ import annotations

import time

from pdlaunch.kv_transfer.base import KVConnectorEvents
from pdlaunch.kv_transfer.messages import ClaimReadRequest
from pdlaunch.kv_transfer.params import RemoteDecodeRequest
from tests.kv_transfer.pd_procs import make_spec, wait_events
from tests.kv_transfer.test_nixl_local import _connector


def test_release_held_frees_before_the_lease() -> None:
    prefill = _connector("prefill", "release-P", kv_lease_seconds=60.0)
    try:
        prefill.register_kv_caches(make_spec())
        hold, params = prefill.request_finished("r1", [1, 2, 3, 4, 5],
                                                RemoteDecodeRequest(do_remote_decode=True), [[3, 4]])
        assert hold and params is not None
        started = time.monotonic()
        assert prefill.release_held("r1") is True
        ev: KVConnectorEvents = wait_events(prefill.get_finished, lambda e: "r1" in e.finished_sending, 5.0,
                                            "the released request in finished_sending")
        assert ev.finished_sending == {"r1"}
        assert time.monotonic() - started < 5.0
        assert prefill.info()["held_requests"] == 0
        assert prefill.release_held("r1") is False  # freed already: nothing to release
        assert prefill.release_held("never-held") is False
    finally:
        prefill.shutdown()


def test_release_held_leaves_a_claimed_read_alone() -> None:
    prefill = _connector("prefill", "release-claimed-P", kv_lease_seconds=60.0)
    try:
        prefill.register_kv_caches(make_spec())
        prefill.request_finished("r1", [1, 2, 3, 4, 5], RemoteDecodeRequest(do_remote_decode=True), [[3, 4]])
        prefill.sender.holds.claim_read(ClaimReadRequest(type="claim_read", load="load-0", request_id="r1", seconds=5.0,
                                                                  reader="decode-0"))
        assert prefill.release_held("r1") is False
        assert prefill.info()["held_requests"] == 1
    finally:
        prefill.shutdown()
