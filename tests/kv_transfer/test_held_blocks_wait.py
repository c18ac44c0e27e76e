"""A decode load with params that name no blocks (vLLM's push proxy) asks the prefill which blocks hold its request
("held_blocks") in short waits, again and again until the load's deadline: the prefill's real handler behind a real
side channel. A hold that comes during the asking is found; none by the deadline fails the load naming what was
asked for; an abort ends the asking within one wait (the e2e test: tests/serving/test_abort_before_transfer_e2e.py),
and while a prefill that took an ask leaves it unanswered, within a look at the abort (client.STOP_POLL_SECONDS): the
ask used to be waited out, up to its wait + the handshake timeout."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.decode.loads import HELD_BLOCKS_WAIT_SECONDS
from pdlaunch.kv_transfer.messages import HeldBlocksAnswer, HeldBlocksRequest
from pdlaunch.kv_transfer.push_params import prompt_digest
from tests.kv_transfer.held_sides import PROMPT, HeldSides, held_sides

WAIT_S = 30.0  # generous: a loaded 2-core machine


@pytest.fixture
def sides() -> Iterator[HeldSides]:
    with held_sides(WAIT_S) as made:
        yield made


def test_a_hold_that_comes_while_the_decode_asks_is_found(sides: HeldSides) -> None:
    load = sides.load(WAIT_S)
    later = threading.Timer(3 * HELD_BLOCKS_WAIT_SECONDS, sides.holds.hold, ("client-1-ffff0000", [[4, 5]],
                                                                           prompt_digest(PROMPT)))
    later.start()
    try:
        sides.loads._ask_block_ids(load)  # noqa: SLF001
    finally:
        later.join()
    assert load.remote.request_id == "client-1-ffff0000" and load.pairs == [[(0, 9, 4)]]
    assert len(sides.asks) >= 2 and all(ask.wait <= HELD_BLOCKS_WAIT_SECONDS for ask in sides.asks)


def test_no_hold_by_the_deadline_fails_the_load_saying_what_it_asked_for(sides: HeldSides) -> None:
    load = sides.load(4 * HELD_BLOCKS_WAIT_SECONDS)
    with pytest.raises(KVTransferError, match="no request with X-Request-Id client-1 of this prompt is held at "
                                              "prefill engine P") as raised:
        sides.loads._ask_block_ids(load)  # noqa: SLF001
    assert raised.value.field == "kv_transfer.transfer_timeout_seconds"
    assert time.monotonic() >= load.deadline and len(sides.asks) >= 2


def test_an_abort_ends_the_asking_within_one_wait(sides: HeldSides) -> None:
    load = sides.load(WAIT_S)
    asking = sides.loads.ctx.executor.submit(sides.loads._ask_block_ids, load)  # noqa: SLF001
    until = time.monotonic() + WAIT_S
    while not sides.asks:
        assert time.monotonic() < until, "the decode never asked"
        time.sleep(0.01)
    with sides.loads.ctx.lock:
        load.abandoned = True  # as LoadTable.abort marks it
    aborted = time.monotonic()
    with pytest.raises(KVTransferError, match="aborted|block ids request to prefill engine P at .*: given up"):
        asking.result(timeout=WAIT_S)
    assert time.monotonic() - aborted < WAIT_S / 2, "the asking went on long after the abort"


def test_an_abort_ends_an_ask_a_stalled_prefill_leaves_unanswered(sides: HeldSides) -> None:
    """The prefill takes the ask and answers only when the test ends; the handshake timeout, which the ask adds to
    its wait, is far above the test's waits: the abort alone ends it."""
    sides.loads.ctx.handshake_timeout = 600.0
    asked, answer = threading.Event(), threading.Event()

    def stalled(message: HeldBlocksRequest) -> HeldBlocksAnswer:
        asked.set()
        assert answer.wait(2 * WAIT_S), "the test never let the ask answer"
        return HeldBlocksAnswer(request_id=None, block_ids=[])

    sides.server.handlers["held_blocks"] = stalled
    load = sides.load(WAIT_S * 4)  # its deadline is no bound either
    try:
        asking = sides.loads.ctx.executor.submit(sides.loads._ask_block_ids, load)  # noqa: SLF001
        assert asked.wait(WAIT_S), "the decode never asked"
        with sides.loads.ctx.lock:
            load.abandoned = True  # as LoadTable.abort marks it
        aborted = time.monotonic()
        with pytest.raises(KVTransferError, match="block ids request to prefill engine P at .*: given up before"):
            asking.result(timeout=WAIT_S)
        assert time.monotonic() - aborted < WAIT_S / 2, "the ask went on long after the abort"
    finally:
        answer.set()  # before the fixture's executor waits for its thread, should the ask still wait


def test_an_answer_of_no_held_request_names_no_blocks() -> None:
    assert HeldBlocksAnswer.model_validate({"request_id": None, "block_ids": []}).request_id is None
    with pytest.raises(ValidationError, match="block_ids of no held request"):
        HeldBlocksAnswer.model_validate({"request_id": None, "block_ids": [[1]]})
