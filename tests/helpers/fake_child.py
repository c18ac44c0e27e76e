"""A child process as the supervisor sees it (poll, running, describe_exit, signal_group), without a process:
the supervision tests set `code` to make it exit and read `signals` for what was sent to its group."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pdlaunch.errors import exit_text


@dataclass
class FakeChild:
    name: str
    log_path: Path
    code: int | None = None  # None: running
    pid: int = 1000
    signals: list[int] = field(default_factory=list)
    reason: str | None = None  # what its log's `exiting: ...` line says

    def poll(self) -> int | None:
        return self.code

    @property
    def running(self) -> bool:
        return self.code is None

    def describe_exit(self) -> str:
        return exit_text(self.code)

    def exit_reason(self) -> str | None:
        return self.reason if self.code not in (None, 0) else None

    def outside_kill(self) -> str | None:
        return None  # the supervision tests' SIGKILLs are the launcher's own

    def signal_group(self, sig: int) -> None:
        self.signals.append(sig)
