"""A decode load of vLLM push-proxy params (no block ids) that gives up asking "held_blocks" (its client left, or it
timed out) tells the prefill what it asked for ("drop_held"): the prefill drops that request's hold now if it holds
it, else as it makes it within the time the decode would have gone on asking. Before, a prefill leg that ended after
its client left the decode leg kept its blocks for the whole lease (600 s in the e2e test,
tests/serving/test_abort_before_transfer_e2e.py). Only a hold of the same client request and prompt is dropped, and
only by its own decode's interest (a decode that pushed from it keeps it)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any, cast

import pytest
from pydantic import ValidationError

from pdlaunch.kv_transfer.messages import ClaimReadRequest, DropHeldRequest, Empty, HeldBlocksRequest
from pdlaunch.kv_transfer.prefill.dropped_asks import MAX_DROPPED_ASKS, AskedFor
from pdlaunch.kv_transfer.prefill.holds import HoldTable
from pdlaunch.kv_transfer.prefill.side import PrefillSide
from pdlaunch.kv_transfer.push_params import prompt_digest
from tests.kv_transfer.held_sides import LEASE_S, PROMPT, HeldSides, held_sides
from tests.kv_transfer.pd_procs import wait_releases_sent

DIGEST = prompt_digest(PROMPT)
OTHER_DIGEST = prompt_digest(list(range(200, 220)))
WAIT_S = 30.0  # generous: a loaded 2-core machine
OWNER = "aaaaaaaaaaaaaaaa"
ASK_WAIT_S = 5.0  # an ask still waiting while the test drops and holds (a few ms)


def _drop(client_id: str = "client-1", digest: str = DIGEST, seconds: float = LEASE_S,
          request_id: str | None = None) -> DropHeldRequest:
    return DropHeldRequest(type="drop_held", request_id=request_id, client_request_id=client_id, prompt_digest=digest,
                           owner=OWNER, seconds=seconds)


def test_a_hold_made_after_its_decode_gave_up_is_freed_at_the_next_poll() -> None:
    holds = HoldTable(lease_seconds=LEASE_S)
    assert holds.drop_held(_drop()) == Empty()
    holds.hold("client-1-0a1b2c3d", [[4, 5]], DIGEST)
    assert holds.poll(time.monotonic()) == {"client-1-0a1b2c3d"}
    holds.hold("client-1-77777777", [[6]], DIGEST)  # the same client and prompt again: that ask was used up
    assert holds.poll(time.monotonic()) == set() and holds.get("client-1-77777777") is not None


def test_a_held_request_is_freed_when_its_decode_gives_up() -> None:
    holds = HoldTable(lease_seconds=LEASE_S)
    holds.hold("client-1-0a1b2c3d", [[4, 5]], DIGEST)
    holds.drop_held(_drop())
    assert holds.poll(time.monotonic()) == {"client-1-0a1b2c3d"}


def test_a_hold_another_decode_read_is_kept_when_one_decode_gives_up(caplog: pytest.LogCaptureFixture) -> None:
    holds = HoldTable(lease_seconds=LEASE_S)
    holds.hold("client-1-0a1b2c3d", [[4, 5]], DIGEST)
    holds.claim_read(ClaimReadRequest(type="claim_read", load="load-b", request_id="client-1-0a1b2c3d", seconds=5.0,
                                      reader="decode-b"))
    with caplog.at_level(logging.INFO, logger="pdlaunch.kv_transfer.prefill.holds"):
        holds.drop_held(_drop())
    assert holds.poll(time.monotonic()) == set() and holds.get("client-1-0a1b2c3d") is not None
    assert "KV of request client-1-0a1b2c3d kept for another decode at it" in caplog.text


def test_a_retry_of_the_same_client_request_that_asks_keeps_its_hold() -> None:
    """The client sends the same X-Request-Id and prompt again after its first decode leg gave up: the retry's
    decode leg asks for it, and the retry's hold is its, not the dropped ask's."""
    holds = HoldTable(lease_seconds=LEASE_S)
    holds.drop_held(_drop())
    holds.asked((None, "client-1", DIGEST))
    holds.hold("client-1-77777777", [[6]], DIGEST)
    assert holds.poll(time.monotonic()) == set() and holds.get("client-1-77777777") is not None


def test_an_ask_of_the_dropping_load_still_waiting_does_not_take_the_drop_back(sides: HeldSides) -> None:
    """The decode gave up its ask, but the prefill's handler of it still waits (up to its `wait`) when the drop comes:
    the hold made then is dropped, and that handler does not hand it out."""
    started = threading.Event()

    def asked(what: AskedFor) -> None:
        sides.holds.asked(what)
        started.set()

    holds = SimpleNamespace(asked=asked, find=sides.holds.find)
    prefill = SimpleNamespace(holds=holds, kv=SimpleNamespace(transfer_timeout_seconds=WAIT_S), kv_epoch=0)
    ask = HeldBlocksRequest(type="held_blocks", client_request_id="client-1", prompt_digest=DIGEST, wait=ASK_WAIT_S)
    with ThreadPoolExecutor(max_workers=1) as pool:
        waiting = pool.submit(PrefillSide._on_held_blocks, cast(Any, prefill), ask)  # noqa: SLF001 - its real handler
        assert started.wait(WAIT_S), "the handler never took the ask"
        sides.holds.drop_held(_drop())
        sides.holds.hold("client-1-0a1b2c3d", [[4, 5]], DIGEST)
        assert sides.holds.poll(time.monotonic()) == {"client-1-0a1b2c3d"}
        sides.holds.hold("client-9-0a1b2c3d", [[7]], prompt_digest([1]))  # not what it waits for
        assert not waiting.done()
    assert waiting.result().request_id is None


@pytest.mark.parametrize("asked", [
    {"digest": OTHER_DIGEST},  # another prompt under the same X-Request-Id: not this load's to free
    {"client_id": "client-2"},
    {"request_id": "client-1-ffffffff"},  # named by request id: that one only
], ids=["other prompt", "other client", "other request id"])
def test_only_the_request_the_decode_asked_for_is_dropped(asked: dict[str, Any]) -> None:
    holds = HoldTable(lease_seconds=LEASE_S)
    holds.hold("client-1-0a1b2c3d", [[4]], DIGEST)
    holds.drop_held(_drop(**asked))
    holds.hold("client-1-12345678", [[5]], DIGEST)
    assert holds.poll(time.monotonic()) == set()
    assert holds.get("client-1-0a1b2c3d") is not None and holds.get("client-1-12345678") is not None


def test_an_ask_is_forgotten_after_its_seconds_and_the_oldest_past_the_cap() -> None:
    holds = HoldTable(lease_seconds=LEASE_S)
    holds.drop_held(_drop(seconds=5.0))
    holds.poll(time.monotonic() + 6.0)  # its time is up: a hold made now is not its
    holds.hold("client-1-0a1b2c3d", [[4]], DIGEST)
    assert holds.poll(time.monotonic()) == set()
    holds.drop_held(_drop(client_id="client-first"))
    for i in range(MAX_DROPPED_ASKS):
        holds.drop_held(_drop(client_id=f"client-{i}-more"))
    holds.hold("client-first-0a1b2c3d", [[5]], DIGEST)
    holds.hold(f"client-{MAX_DROPPED_ASKS - 1}-more-0a1b2c3d", [[6]], DIGEST)
    assert holds.poll(time.monotonic()) == {f"client-{MAX_DROPPED_ASKS - 1}-more-0a1b2c3d"}


def test_the_seconds_are_clamped_to_the_lease() -> None:
    holds = HoldTable(lease_seconds=LEASE_S)
    holds.drop_held(_drop(seconds=3600.0))
    holds.poll(time.monotonic() + LEASE_S + 1.0)
    holds.hold("client-1-0a1b2c3d", [[4]], DIGEST)
    assert holds.poll(time.monotonic()) == set()


@pytest.mark.parametrize("bad", [{"prompt_digest": "zz"}, {"seconds": float("inf")}, {"seconds": -1.0},
                                 {"owner": ""}, {"client_request_id": "x" * 513}])
def test_a_malformed_drop_is_refused(bad: dict[str, Any]) -> None:
    fields = {"type": "drop_held", "client_request_id": "client-1", "prompt_digest": DIGEST, "owner": OWNER,
              "seconds": 1.0, **bad}
    with pytest.raises(ValidationError):
        DropHeldRequest.model_validate(fields)


@pytest.fixture
def sides() -> Iterator[HeldSides]:
    with held_sides(WAIT_S) as made:
        yield made


def test_an_aborted_load_tells_the_prefill_which_later_frees_the_hold_at_once(sides: HeldSides) -> None:
    load = sides.load(WAIT_S)
    load.abandoned = True  # its client left before the first ask (as LoadTable.abort marks it)
    sides.loads.run(load)
    wait_releases_sent(sides.loads.ctx.releases, WAIT_S)  # the loader hands its release to a release thread
    assert [(d.client_request_id, d.prompt_digest, d.request_id, d.owner) for d in sides.drops] == [
        ("client-1", DIGEST, None, load.nonce)]
    assert 0.0 < sides.drops[0].seconds <= WAIT_S
    sides.holds.hold("client-1-ffff0000", [[4, 5]], DIGEST)  # the prefill leg ends only now
    assert sides.holds.poll(time.monotonic()) == {"client-1-ffff0000"}


def test_a_load_that_timed_out_asking_tells_the_prefill_too(sides: HeldSides) -> None:
    load = sides.load(1.0)
    sides.loads.run(load)
    wait_releases_sent(sides.loads.ctx.releases, WAIT_S)  # the loader hands its release to a release thread
    assert load.error is not None and "no request with X-Request-Id client-1" in load.error
    assert [d.client_request_id for d in sides.drops] == ["client-1"]


def test_a_load_whose_hold_was_named_cancels_it_and_drops_nothing(sides: HeldSides) -> None:
    """Once "held_blocks" named the request, the load's end goes through cancel_push (tests/kv_transfer/
    test_unstarted_drop.py): drop_held is for what was asked for and never named."""
    sides.server.handlers["cancel_push"] = lambda message: sides.holds.cancel_push(message)
    sides.holds.hold("client-1-ffff0000", [[4, 5]], DIGEST)
    load = sides.load(WAIT_S)
    load.plan = lambda remote: (_ for _ in ()).throw(ValueError("cannot plan"))  # ends before its strategy
    sides.loads.run(load)
    wait_releases_sent(sides.loads.ctx.releases, WAIT_S)  # the loader hands its release to a release thread
    assert sides.drops == [] and sides.holds.poll(time.monotonic()) == {"client-1-ffff0000"}
