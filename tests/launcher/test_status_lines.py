"""Without a TTY (nohup, systemd, a CI log) the status table prints a row when its state changes, and a change of its
KV blocks alone in one line a minute at most (the first at once): they change with every request, and `pdlaunch serve`
under a light load printed `ready blocks N/M` for an instance every 2 s, burying the deaths and restarts among them."""

from __future__ import annotations

import io

from rich.console import Console

from pdlaunch.launcher.status import BLOCKS_LINE_EVERY_S, StatusRow, StatusView


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _view() -> tuple[StatusView, StatusRow, io.StringIO, Clock]:
    out, clock = io.StringIO(), Clock()
    row = StatusRow("decode-0", "decode", "cpu", "http://127.0.0.1:9000", state="ready", blocks_used=0,
                    blocks_total=100)
    view = StatusView(Console(file=out, force_terminal=False, width=200), [row], "test", clock=clock)
    view.start()
    return view, row, out, clock


def _lines(out: io.StringIO) -> list[str]:
    return [" ".join(line.split()) for line in out.getvalue().splitlines()]


def test_blocks_alone_print_at_most_once_a_minute() -> None:
    view, row, out, clock = _view()
    for used in range(1, 41):  # a request starts or ends at every 2 s refresh, for 80 s
        clock.now += 2.0
        row.blocks_used = used % 3
        view.update()
    # at start; the first change of blocks at once (2 s); the next one due once a minute has passed (64 s)
    assert _lines(out) == ["[pdlaunch] decode-0 decode cpu http://127.0.0.1:9000 ready blocks 0/100",
                           "[pdlaunch] decode-0 decode cpu http://127.0.0.1:9000 ready blocks 1/100",
                           "[pdlaunch] decode-0 decode cpu http://127.0.0.1:9000 ready blocks 2/100"]


def test_the_latest_blocks_print_once_the_minute_is_over() -> None:
    view, row, out, clock = _view()
    clock.now += 1.0
    row.blocks_used = 7
    view.update()
    assert len(_lines(out)) == 2 and _lines(out)[-1].endswith("blocks 7/100")  # the first change: at once
    clock.now += 2.0
    row.blocks_used = 4
    view.update()
    assert len(_lines(out)) == 2  # within the minute: held back
    clock.now += BLOCKS_LINE_EVERY_S
    view.update()
    assert len(_lines(out)) == 3 and _lines(out)[-1].endswith("blocks 4/100")
    clock.now += 2.0
    row.blocks_used = 3
    view.update()
    clock.now += BLOCKS_LINE_EVERY_S
    view.update()
    view.update()
    assert len(_lines(out)) == 4 and _lines(out)[-1].endswith("blocks 3/100")


def test_a_state_change_prints_at_once() -> None:
    view, row, out, clock = _view()
    clock.now += 1.0
    row.blocks_used = 5
    view.update()
    clock.now += 1.0
    row.state = "restarting (1)"
    view.update()
    clock.now += 1.0
    row.state = "ready"
    view.update()
    assert [line.split(" cpu ")[1].split(None, 1)[1] for line in _lines(out)] == [
        "ready blocks 0/100", "ready blocks 5/100", "restarting (1) blocks 5/100", "ready blocks 5/100"]
