"""`--backend ray`: an instance's actor that a kill from outside ended, said as the local launcher says it of a child
process (launcher/process.py OUTSIDE_SIGKILL): who sends such a kill, and where to look.

Ray does not hand the driver the signal that ended an actor's worker process; it says how the worker ended in the
actor's death cause (ActorDiedError): `Worker exit type: NODE_OUT_OF_MEMORY` when Ray's own memory monitor killed it,
`Worker exit type: SYSTEM_ERROR` with `Worker exit detail: Worker unexpectedly exits with a connection error code ...`
when the process vanished without exiting (a SIGKILL: the kernel's OOM killer most often), as Ray 2.x words it.
"""

from __future__ import annotations

import re

RAY_MEMORY_MONITOR = "NODE_OUT_OF_MEMORY"
UNEXPECTED_EXIT = re.compile(r"Worker exit type: SYSTEM_ERROR\b.*unexpectedly exits", re.DOTALL)
NODE_IP = re.compile(r"^\s*ip: (\S+)$", re.MULTILINE)  # the field Ray's ActorDiedError lists


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
