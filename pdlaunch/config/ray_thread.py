"""Ray's calls (ray.init, ray.nodes, the GPU probe's task, ray.shutdown) run in a helper thread while the main thread
waits for them, so that no stop signal's exception is ever raised inside Ray's code.

Python runs a signal handler in the main thread, between two bytecodes of whatever runs there; StopSignals' handler
raises StopRequested (launcher/serve.py). Raised inside Ray's code, that exception can part two steps of Ray's that
must not be parted: inside ray.init it dropped a GlobalStateAccessor made and not yet connected, whose destructor
then blocked for good in pthread_cond_destroy holding the GIL (2 SIGINTs of 30; config/ray_init.py). Inside the
GPU probe's ray.get (ray_cluster.cluster_gpus) Ray turned it into a SystemError ("returned a result with an
exception set"), which check-config then reported as a GPU it could not read, after a wait of half a minute.

Here the handler raises in the main thread's wait below, and the call goes on in its thread. Ray must then not be
torn down under it (ray.shutdown, or the atexit hook Ray registers, can crash or hang on a call still running), so
`cut_short()` names it until the process leaves, with os._exit (launcher/backends/ray_connect_stop.py); a call that
outlives its bound is left running the same way.
"""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import TypeVar

from pdlaunch.errors import PdlaunchError

POLL_S = 0.1  # the longest a stop signal waits to be seen (Python runs handlers in the main thread only)
T = TypeVar("T")

_running: str | None = None  # what the Ray call under way (or one cut short, still running) is doing


def in_ray_thread(ray: ModuleType, work: Callable[[], T], doing: str, timeout_s: float, late: PdlaunchError,
                  name: str = "ray") -> T:
    """work() (Ray calls; `doing` says what it does, e.g. "listing the Ray cluster's nodes"), run in a helper thread
    called `name`; what it returned is returned and what it raised is raised here. A stop signal meanwhile raises
    here within POLL_S. `late` (naming the bound) is raised when work() has not finished within `timeout_s`; it
    goes on running then, and cut_short() names it."""
    global _running
    results: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(work())
        except BaseException as exc:  # noqa: BLE001 (handed to the waiting thread, which raises it)
            errors.append(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    _running = doing
    thread.start()
    deadline = time.monotonic() + timeout_s
    while thread.is_alive() and time.monotonic() < deadline:
        # A signal's handler runs (and may raise) inside this wait: at once when the kernel hands the signal to
        # this thread, within POLL_S when it hands it to one of Ray's. Raised, it leaves _running set.
        thread.join(POLL_S)
    if not results and not errors:
        atexit.unregister(ray.shutdown)  # tearing Ray down under a call that still runs may crash or hang the exit
        raise late
    _running = None
    if errors:
        raise errors[0]
    return results[0]


def cut_short() -> str | None:
    """What the Ray call still running in its thread is doing (a stop signal, or its bound, ended the wait for it;
    Ray must not be torn down under it), else None."""
    return _running

