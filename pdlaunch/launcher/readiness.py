"""Waiting for a deployment's processes to be ready: every POLL_S each one still pending is probed until all are
ready; a child of ours that exits raises ChildExited at once, the deadline an error naming those still pending."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pdlaunch.config.rules.rendezvous import LAUNCHER_READY_S
from pdlaunch.errors import PdlaunchError, exit_text
from pdlaunch.launcher.plan import InstancePlan
from pdlaunch.launcher.process import ChildProcess
from pdlaunch.launcher.status import StatusRow, StatusView

# a large checkpoint on a slow disk; a dead child is noticed at once anyway (one value with check-config's rule)
READY_TIMEOUT_S = LAUNCHER_READY_S
# A probe is one local GET /health (a 503 while loading): cheap. Each wait ends POLL_S / 2 after its readiness on
# average, twice a start (instances, then the proxy): 0.25 s cost ~0.25 s of every `pdlaunch serve`.
POLL_S = 0.1

T = TypeVar("T")  # what a wait is for: our children, or instances on other nodes


class ChildExited(PdlaunchError):
    """A child process ended while it should have been serving."""

    def __init__(self, child: ChildProcess, code: int) -> None:
        self.child = child
        self.code = code
        ours = child.poll() == code  # its log and its kill describe the run that ended with `code`
        outside, reason = (child.outside_kill(), child.exit_reason()) if ours else (None, None)
        super().__init__(f"{child.name} (pid {child.pid}) {exit_text(code)}" + (f": {reason}" if reason else "")
                         + (f" ({outside})" if outside else ""), hint=f"its log: {child.log_path}")


@dataclass
class ReadyWait:
    """One start's wait: the status rows and view it updates, and its deadline, `timeout` seconds after it began."""

    view: StatusView
    rows: dict[str, StatusRow]
    dead_child: Callable[[], tuple[ChildProcess, int] | None]
    deadline: float
    timeout: float
    should_stop: Callable[[], bool]

    def until(self, waiting_for: list[T], is_ready: Callable[[T], bool],
              late: Callable[[list[T]], PdlaunchError]) -> bool:
        """Probe every POLL_S until all of `waiting_for` are ready (True) or should_stop() (False); a
        child of ours that exits raises ChildExited, the deadline raises `late(those still pending)`."""
        pending = list(waiting_for)
        while pending:
            if self.should_stop():
                return False
            dead = self.dead_child()
            if dead is not None:
                self.rows[dead[0].name].state = f"exited ({dead[1]})"
                self.view.update()
                raise ChildExited(*dead)
            pending = [item for item in pending if not is_ready(item)]
            self.view.update()
            if not pending:
                break
            if time.monotonic() > self.deadline:
                raise late(pending)
            time.sleep(POLL_S)
        return True

    def children_late(self, pending: list[ChildProcess], log_dir: Path) -> PdlaunchError:
        waiting = ", ".join(f"{c.name} ({self.rows[c.name].state})" for c in pending)
        return PdlaunchError(f"not ready after {self.timeout:.0f}s: {waiting}", hint=f"see the logs in {log_dir}")

    def remote_late(self, pending: list[InstancePlan], foreign: Callable[[InstancePlan], str]) -> PdlaunchError:
        """Instances other nodes' launchers start, still not ready; `foreign` says where another server answers."""
        waiting = ", ".join(f"{p.spec.name} on node {p.node} ({p.url}{foreign(p)})" for p in pending)
        nodes = sorted({p.node for p in pending})
        return PdlaunchError(f"instances on other nodes not ready after {self.timeout:.0f}s: {waiting}",
                             hint="run `pdlaunch serve CONFIG --node-rank K` on node(s) "
                             f"{', '.join(map(str, nodes))} and check that node 0 reaches their addresses")
