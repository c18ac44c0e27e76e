"""ray.init run in a helper thread while the main thread waits for it, so that no stop signal raises inside it.

Python runs a signal handler in the main thread, between two bytecodes of whatever runs there. StopSignals'
handler raises StopRequested (launcher/serve.py), and ray.init, called in the main thread, installs a SIGTERM
handler of Ray's that raises SystemExit. Raised inside ray.init, such an exception can fall between two steps of
Ray's that must not be parted: Ray makes a GlobalStateAccessor (a C++ object that starts a thread running its
io_context) and only then connects it, and the destructor of one never connected leaves that thread running and
destroys the io_context under it, blocking for ever in pthread_cond_destroy with the GIL held. No later signal
can end the process then; only SIGKILL does (`pdlaunch check-config` given SIGINT about 15 ms into ray.init hung
so in 2 runs of 30).

Here ray.init runs in a daemon thread and never sees a signal's exception: the handler raises in the main
thread's wait below, and the caller leaves the process at once with ray.init still running in its thread
(os._exit, launcher/backends/ray_connect_stop.py). Outside the main thread ray.init installs no SIGTERM handler,
so SIGTERM stays StopSignals' (Ray's warning that it did not install one is dropped).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from types import ModuleType

from pdlaunch.config.ray_gcs import FIELD
from pdlaunch.errors import PdlaunchError

# A backstop: ray.init gives up on its own well before (its GCS client retries for about a minute), and the GCS
# was seen answering just before it (ray_gcs.check_gcs_answers).
INIT_TIMEOUT_S = 300.0
POLL_S = 0.1  # the longest a stop signal waits to be seen (Python runs handlers in the main thread only)
_NO_SIGTERM_HANDLER = "SIGTERM handler is not set because current thread is not the main thread"


def _drop_no_sigterm_warning(record: logging.LogRecord) -> bool:
    return _NO_SIGTERM_HANDLER not in str(record.msg)


def init_in_thread(ray: ModuleType, address: str, **kwargs: object) -> None:
    """ray.init(address=address, **kwargs), run in a helper thread; what it raised is raised here. A stop signal
    meanwhile raises here within POLL_S (its handler runs in this, the main, thread). PdlaunchError when ray.init
    has not returned within INIT_TIMEOUT_S."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            ray.init(address=address, **kwargs)
        except BaseException as exc:  # noqa: BLE001 (handed to the waiting thread, which raises it)
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, name="ray.init", daemon=True)
    worker_log = logging.getLogger("ray._private.worker")
    worker_log.addFilter(_drop_no_sigterm_warning)  # kept while ray.init runs (a stop leaves it running)
    thread.start()
    deadline = time.monotonic() + INIT_TIMEOUT_S
    while thread.is_alive() and time.monotonic() < deadline:
        # A signal's handler runs (and may raise) inside this wait: at once when the kernel hands the signal to
        # this thread, within POLL_S when it hands it to one of Ray's.
        thread.join(POLL_S)
    if not outcome:
        atexit.unregister(ray.shutdown)  # tearing down a ray.init that still runs may crash or hang the exit
        raise PdlaunchError(f"ray.init did not return within {INIT_TIMEOUT_S:.0f}s of connecting to the Ray cluster "
                            f"at {address}", field=FIELD, hint="check the head with `ray status --address "
                            f"{address}` there; it may be overloaded or stuck")
    worker_log.removeFilter(_drop_no_sigterm_warning)
    if outcome[0] is not None:
        raise outcome[0]
