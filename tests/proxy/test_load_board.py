"""The load board (pdlaunch/proxy/load_board.py): the load counts every proxy worker shares. Two boards over one
file stand for two workers: each writes its own row only, a read sums the rows, a fresh board is zeroed, and a
worker whose instances differ from the file's refuses to start, naming the flag. Through the pool, the counts a
worker adds are the ones it removes, and round robin starts at the worker's index."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pdlaunch.model.demo import resolve_model_path
from pdlaunch.proxy.__main__ import parse_args
from pdlaunch.proxy.disaggregate import PD, SPILLED, Disaggregation, spilled_on
from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.proxy.load_board import COLUMNS, IN_FLIGHT, QUEUED_TOKENS, SPILLED_TOKENS, BoardMismatch, LoadBoard
from pdlaunch.proxy.prefix import PrefixRouter, queued

NAMES = ["prefill-0", "decode-0", "decode-1"]


def _instances() -> list[Instance]:
    return [Instance("prefill", "http://127.0.0.1:1", "prefill-0", state="ready"),
            Instance("decode", "http://127.0.0.1:2", "decode-0", state="ready"),
            Instance("decode", "http://127.0.0.1:3", "decode-1", state="ready")]


def _rows_never_negative(*boards: LoadBoard) -> None:
    for board in boards:
        for instance in range(len(board.names)):
            for column in range(len(COLUMNS)):
                assert board.own(instance, column) >= 0, (board.row, board.names[instance], COLUMNS[column])


def test_two_workers_write_their_own_rows_and_read_the_sum(tmp_path: Path) -> None:
    path = tmp_path / "board"
    LoadBoard.create(path, NAMES, rows=2)
    first, second = LoadBoard.open(path, NAMES, 0), LoadBoard.open(path, NAMES, 1)
    assert all(first.total(i, c) == 0 for i in range(3) for c in range(len(COLUMNS)))  # zeroed at creation
    first.add(1, IN_FLIGHT, 2)
    second.add(1, IN_FLIGHT, 3)
    second.add(2, QUEUED_TOKENS, 700)
    assert first.total(1, IN_FLIGHT) == second.total(1, IN_FLIGHT) == 5
    assert (first.own(1, IN_FLIGHT), second.own(1, IN_FLIGHT)) == (2, 3)  # each its own row
    assert first.total(2, QUEUED_TOKENS) == 700 and first.own(2, QUEUED_TOKENS) == 0
    assert first.total(0, IN_FLIGHT) == 0 and first.total(1, QUEUED_TOKENS) == 0  # no cell bleeds into another
    first.add(1, IN_FLIGHT, -2)
    assert second.total(1, IN_FLIGHT) == 3
    _rows_never_negative(first, second)


def test_a_new_board_is_zeroed_and_never_reuses_a_file(tmp_path: Path) -> None:
    path = tmp_path / "board"
    LoadBoard.create(path, NAMES, rows=2)
    LoadBoard.open(path, NAMES, 0).add(0, SPILLED_TOKENS, 9)
    with pytest.raises(FileExistsError):  # a stale board is never taken over: the supervisor makes a new one
        LoadBoard.create(path, NAMES, rows=2)
    fresh = tmp_path / "fresh"
    LoadBoard.create(fresh, NAMES, rows=2)
    assert LoadBoard.open(fresh, NAMES, 1).total(0, SPILLED_TOKENS) == 0


def test_a_worker_with_other_instances_or_no_row_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "board"
    LoadBoard.create(path, NAMES, rows=2)
    with pytest.raises(BoardMismatch, match="made for 3 instances, this worker has 2"):
        LoadBoard.open(path, NAMES[:2], 0)
    with pytest.raises(BoardMismatch, match="named otherwise or in another order"):
        LoadBoard.open(path, [NAMES[0], NAMES[2], NAMES[1]], 0)
    with pytest.raises(BoardMismatch, match="rows for 2 workers, not for worker index 2"):
        LoadBoard.open(path, NAMES, 2)
    junk = tmp_path / "junk"
    junk.write_bytes(b"x" * 200)
    with pytest.raises(BoardMismatch, match="no load board"):
        LoadBoard.open(junk, NAMES, 0)


def test_the_pool_and_the_router_count_on_the_board_and_take_back_what_they_added(tmp_path: Path) -> None:
    path = tmp_path / "board"
    LoadBoard.create(path, NAMES, rows=2)
    other = LoadBoard.open(path, NAMES, 1)  # the other worker: 4 legs and 100 queued tokens on decode-0
    other.add(1, IN_FLIGHT, 4)
    other.add(1, QUEUED_TOKENS, 100)
    instances = _instances()
    pool = InstancePool(instances, "least_loaded", board=LoadBoard.open(path, NAMES, 0))
    decode = instances[1]
    assert decode.in_flight == 4 and queued(decode) == 100
    assert pool.pick("decode").name == "decode-1"  # the other worker's legs count
    router = PrefixRouter(pool, None, None, by_prefix=False)
    assert router.least_queued("decode") == 0
    with decode.lease():
        release = router.enqueue(decode, 30)
        assert decode.in_flight == 5 and queued(decode) == 130 and pool.board.own(1, IN_FLIGHT) == 1
        release()
        release()  # once only
    assert decode.in_flight == 4 and queued(decode) == 100
    assert pool.board.own(1, IN_FLIGHT) == pool.board.own(1, QUEUED_TOKENS) == 0
    _rows_never_negative(pool.board, other)


def test_spilled_tokens_are_counted_over_every_worker(tmp_path: Path) -> None:
    path = tmp_path / "board"
    LoadBoard.create(path, NAMES, rows=2)
    LoadBoard.open(path, NAMES, 1).add(1, SPILLED_TOKENS, 20)  # the other worker spilled 20 onto decode-0
    instances = _instances()
    InstancePool(instances, "round_robin", board=LoadBoard.open(path, NAMES, 0))
    decider = Disaggregation(8, resolve_model_path("tiny"), 20)
    assert spilled_on(instances[1]) == 20
    assert decider.decision(24, prefill_queued=20, decode=instances[1]) == PD  # its cap is full: both workers'
    release = decider.spill(instances[2], 24)
    assert decider.decision(24, prefill_queued=20, decode=instances[2]) == PD
    release()
    assert decider.decision(24, prefill_queued=20, decode=instances[2]) == SPILLED
    _rows_never_negative(instances[0].board)


def test_round_robin_starts_at_the_workers_index(tmp_path: Path) -> None:
    path = tmp_path / "board"
    LoadBoard.create(path, NAMES, rows=2)
    first, second = _instances(), _instances()
    picks = [InstancePool(first, "round_robin", board=LoadBoard.open(path, NAMES, 0)).pick("decode").name,
             InstancePool(second, "round_robin", board=LoadBoard.open(path, NAMES, 1)).pick("decode").name]
    assert picks == ["decode-0", "decode-1"]


def test_a_worker_started_with_another_instance_list_exits_1_naming_the_flag(tmp_path: Path) -> None:
    path = tmp_path / "board"
    LoadBoard.create(path, ["colocated-0", "colocated-1"], rows=2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        r = subprocess.run([sys.executable, "-m", "pdlaunch.proxy", "--colocated", "http://127.0.0.1:1",
                            "--listen-fd", str(sock.fileno()), "--worker-index", "0", "--load-board", str(path)],
                           pass_fds=[sock.fileno()], capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL)
    assert r.returncode == 1, r.stderr
    assert f"proxy[0]: --load-board {path}: it was made for 2 instances, this worker has 1 (colocated-0)" \
        in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_the_internal_worker_flags_go_together(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def refused(argv: list[str]) -> str:
        with pytest.raises(SystemExit):
            parse_args(["--colocated", "http://127.0.0.1:1", *argv])
        return capsys.readouterr().err

    assert "--load-board without the rest of --listen-fd, --worker-index and --load-board" in \
        refused(["--load-board", str(tmp_path)])
    with socket.socket() as sock:
        fd = str(sock.fileno())
        assert "--listen-fd and --worker-index without the rest" in refused(["--listen-fd", fd, "--worker-index", "0"])
        assert f"--load-board {tmp_path / 'none'}: no such file" in \
            refused(["--listen-fd", fd, "--worker-index", "0", "--load-board", str(tmp_path / "none")])
        board = tmp_path / "board"
        LoadBoard.create(board, ["colocated-0"], rows=1)
        assert "--worker-index -1: must be 0 or more" in \
            refused(["--listen-fd", fd, "--worker-index", "-1", "--load-board", str(board)])
        assert parse_args(["--colocated", "http://127.0.0.1:1", "--listen-fd", fd, "--worker-index", "0",
                           "--load-board", str(board)]).load_board == board
    assert os.path.exists(board)


class _MovingBoard(LoadBoard):
    """A board whose other workers change decode-0's legs between two reads: each read of it sees one more."""

    def __init__(self) -> None:
        board = LoadBoard.in_process(NAMES)
        super().__init__(bytearray(board._buffer), NAMES, 0, 1)
        self.reads = 0

    def total(self, instance: int, column: int) -> int:
        if NAMES[instance] != "decode-0" or column != IN_FLIGHT:
            return super().total(instance, column)
        self.reads += 1
        return self.reads - 1


def test_least_loaded_reads_each_count_once_while_other_workers_change_them() -> None:
    # With two reads (the fewest, then who has it), decode-0 read 0 then 1: nobody was at the fewest, and the
    # tie-break's round robin over no candidate raised ZeroDivisionError (a 500 to the client).
    board = _MovingBoard()
    pool = InstancePool(_instances(), "least_loaded", board=board)
    assert pool.pick("decode").name == "decode-0"
    assert board.reads == 1
