"""`--backend ray`: an instance's actor that a kill from outside ended, said as the local launcher says it of a child
process (launcher/process.py OUTSIDE_SIGKILL): who sends such a kill, and where to look.

Ray does not hand the driver the signal that ended an actor's worker process; it says how the worker ended in the
actor's death cause (ActorDiedError): `Worker exit type: NODE_OUT_OF_MEMORY` when Ray's own memory monitor killed it,
`Worker exit type: SYSTEM_ERROR` with `Worker exit detail: Worker unexpectedly exits with a connection error code ...`
when the process vanished without exiting (a SIGKILL: the kernel's OOM killer most often), as Ray 2.x words it.

Ray also tells the driver of such a death itself: its raylet publishes "A worker died or was killed while executing a
task by an unexpected system error. ..." (or "N worker(s) were killed due to the node running low on memory. ...") and
every driver prints what its raylets publish (ray._private.worker.listen_error_messages, a thread each driver runs
whatever log_to_driver says), a paragraph beside the launcher's own line for the same death. quiet_worker_deaths drops
those two; every other message of Ray's (a node marked dead, ...) is printed as Ray prints it.
"""

from __future__ import annotations

import re
from types import ModuleType

RAY_MEMORY_MONITOR = "NODE_OUT_OF_MEMORY"
UNEXPECTED_EXIT = re.compile(r"Worker exit type: SYSTEM_ERROR\b.*unexpectedly exits", re.DOTALL)
NODE_IP = re.compile(r"^\s*ip: (\S+)$", re.MULTILINE)  # the field Ray's ActorDiedError lists
# what the raylet publishes to the driver when a worker dies (Ray 2.60's raylet words them so)
WORKER_DEATH_NOTICES = ("A worker died or was killed while executing a task",
                        "were killed due to the node running low on memory")


def outside_kill(ray_error: str) -> str | None:
    """Who killed the actor whose death Ray describes in `ray_error` (the text of the exception, causes included), and
    where to look; None when Ray does not say it was killed from outside (an exception, a node that died, our kill)."""
    found = NODE_IP.search(ray_error)
    node = f"node {found.group(1)}" if found else "its node"
    if RAY_MEMORY_MONITOR in ray_error:
        return (f"killed by Ray's memory monitor: {node} ran low on memory (the raylet's log there names what held "
                "it; give that node more memory, or run fewer or smaller instances on it; RAY_memory_usage_threshold "
                "when starting Ray moves the limit)")
    if UNEXPECTED_EXIT.search(ray_error):
        return (f"a SIGKILL pdlaunch did not send: most often the kernel's OOM killer on {node} (`dmesg | grep -i "
                "oom` or `journalctl -k` there names the process; give it more memory, or run fewer or smaller "
                "instances on it), else someone's `kill -9` or a crash (SIGSEGV; the instance's log)")
    return None


def _is_worker_death(line: object) -> bool:
    return isinstance(line, str) and any(notice in line for notice in WORKER_DEATH_NOTICES)


def quiet_worker_deaths(ray: ModuleType) -> None:
    """Drop, from what the driver `ray` (connected) prints of its raylets' messages, those telling of a worker's death
    (the module's docstring says why); idempotent. Nothing changes where Ray's driver does not print them through
    ray._private.worker.print_to_stdstream (another Ray version)."""
    worker = getattr(getattr(ray, "_private", None), "worker", None)
    printer = getattr(worker, "print_to_stdstream", None)
    if not isinstance(worker, ModuleType) or not callable(printer) or getattr(printer, "pdlaunch_quiet", False):
        return

    def without_worker_deaths(data: dict[str, object], ignore_prefix: bool) -> None:
        lines = data.get("lines")
        if data.get("pid") == "raylet" and isinstance(lines, list):
            kept = [line for line in lines if not _is_worker_death(line)]
            if not kept:
                return
            data = {**data, "lines": kept}
        printer(data, ignore_prefix)

    without_worker_deaths.pdlaunch_quiet = True  # type: ignore[attr-defined]
    vars(worker)["print_to_stdstream"] = without_worker_deaths  # the name listen_error_messages calls
