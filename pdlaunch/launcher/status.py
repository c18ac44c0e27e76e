"""What the launcher shows while a deployment comes up: a rich Live table on a TTY, plain lines otherwise."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console
from rich.live import Live
from rich.table import Table

_STATE_STYLE = {"ready": "green", "loading": "yellow", "starting": "yellow", "restarting": "yellow", "failed": "red",
                "exited": "red", "stalled": "red", "not": "red", "port": "red", "down": "red", "unhealthy": "red",
                "stopping": "magenta", "stopped": "dim"}
# Without a TTY (nohup, systemd, a CI log) a row prints when its state changes, and when only its KV blocks did, at
# most one such line this often: they change with every request, and a row printed at each 2 s refresh filled a
# day's log with 43,200 `ready blocks N/M` lines an instance, burying the deaths and restarts among them. The first
# change of blocks after a quiet minute prints at once (an operator watching the first requests sees them land).
BLOCKS_LINE_EVERY_S = 60.0


@dataclass
class StatusRow:
    name: str
    role: str
    devices: str  # "cpu", "cuda:0,1"
    url: str
    # starting | loading | ready | port taken (another server answers there) | stalled (alive, no answer) |
    # restarting (N) | failed | exited | stopping | stopped. An instance another node runs: on node 0, what its
    # /health says (ready | loading | failed | stalled | down: refused | unhealthy (HTTP N) | not this instance:
    # another server answers there); elsewhere "remote"
    state: str = "starting"
    blocks_used: int | None = None
    blocks_total: int | None = None

    @property
    def blocks(self) -> str:
        if self.blocks_total is None:
            return "-"
        return f"{self.blocks_used or 0}/{self.blocks_total}"

    def line(self) -> str:
        return f"{self.name:<12} {self.role:<9} {self.devices:<10} {self.url:<26} {self.state:<8} blocks {self.blocks}"


class StatusView:
    """Call `update()` whenever rows changed; on a TTY the table redraws, else changed rows print once (a change
    of KV blocks alone: one line at most every BLOCKS_LINE_EVERY_S)."""

    def __init__(self, console: Console, rows: list[StatusRow], title: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.console = console
        self.rows = rows
        self.title = title
        self._live: Live | None = None
        self._clock = clock
        self._printed: dict[str, tuple[str, str]] = {}  # name: (state, blocks) as last printed
        self._blocks_line_at: dict[str, float] = {}  # name: when its last line for a change of blocks alone printed

    def table(self) -> Table:
        table = Table(title=self.title, title_justify="left")
        for column in ("instance", "role", "devices", "URL", "state", "KV blocks"):
            table.add_column(column, no_wrap=True)
        for row in self.rows:
            style = _STATE_STYLE.get(row.state.split()[0], "")
            table.add_row(row.name, row.role, row.devices, row.url, f"[{style}]{row.state}[/]" if style else row.state,
                          row.blocks)
        return table

    def start(self, print_rows: bool = True) -> None:
        """On a TTY the live table appears; otherwise the rows print now, or (print_rows False: they
        were just printed by another view) only once they change."""
        if self.console.is_terminal:
            self._live = Live(self.table(), console=self.console, refresh_per_second=4, transient=False)
            self._live.start()
        elif print_rows:
            self.update()
        else:
            for row in self.rows:
                self._printed[row.name] = self._key(row)

    @staticmethod
    def _key(row: StatusRow) -> tuple[str, str]:
        return row.state, row.blocks if row.state == "ready" else ""

    def update(self) -> None:
        if self._live is not None:
            self._live.update(self.table())
            return
        now = self._clock()
        for row in self.rows:
            key, printed = self._key(row), self._printed.get(row.name)
            if printed == key:
                continue
            if printed is not None and printed[0] == key[0]:  # only its blocks changed
                if now - self._blocks_line_at.get(row.name, -BLOCKS_LINE_EVERY_S) < BLOCKS_LINE_EVERY_S:
                    continue  # such a line printed within the minute: the next due update prints the latest
                self._blocks_line_at[row.name] = now
            self._printed[row.name] = key
            self.console.print(f"[pdlaunch] {row.line()}", highlight=False, markup=False, soft_wrap=True)

    def stop(self) -> None:
        if self._live is not None:
            self._live.update(self.table())
            self._live.stop()
            self._live = None
