"""ray.init run in a helper thread while the main thread waits for it (config/ray_thread.py), so that no stop
signal raises inside it.

ray.init, called in the main thread, installs a SIGTERM handler of Ray's that raises SystemExit, and StopSignals'
handler raises StopRequested (launcher/serve.py). Raised inside ray.init, such an exception can fall between two
steps of Ray's that must not be parted: Ray makes a GlobalStateAccessor (a C++ object that starts a thread running
its io_context) and only then connects it, and the destructor of one never connected leaves that thread running and
destroys the io_context under it, blocking for ever in pthread_cond_destroy with the GIL held. No later signal can
end the process then; only SIGKILL does (`pdlaunch check-config` given SIGINT about 15 ms into ray.init hung so in 2
runs of 30).

Here ray.init never sees a signal's exception: the handler raises in the main thread's wait, and the caller leaves
the process at once with ray.init still running in its thread (os._exit, launcher/backends/ray_connect_stop.py).
Outside the main thread ray.init installs no SIGTERM handler of its own (Ray's warning that it did not install one is
dropped), but its core worker does install a C++ one (abseil's failure signal handler), over StopSignals' at the
OS level: a SIGTERM then printed "*** SIGTERM received at time=... ***" and a C++ stack before our handler ran. The
Python handlers are put back as ray.init returns.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import ModuleType

from pdlaunch.config.ray_gcs import FIELD
from pdlaunch.config.ray_thread import cut_short, in_ray_thread
from pdlaunch.errors import PdlaunchError

# A backstop: ray.init gives up on its own well before (its GCS client retries for about a minute), and the GCS
# was seen answering just before it (ray_gcs.check_gcs_answers).
INIT_TIMEOUT_S = 300.0
_tried = False  # this process called ray.init: it has a driver to take off the cluster at its end
_NO_SIGTERM_HANDLER = "SIGTERM handler is not set because current thread is not the main thread"


def _drop_no_sigterm_warning(record: logging.LogRecord) -> bool:
    return _NO_SIGTERM_HANDLER not in str(record.msg)


def _reclaim_signals() -> None:
    """Each stop signal's Python handler set again at the OS level, where Ray's core worker put its own."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        handler = signal.getsignal(sig)
        if handler is not None:  # None: set outside Python; left alone
            signal.signal(sig, handler)


def connected_address(ray: ModuleType | None) -> str | None:
    """The GCS address (HOST:PORT) of the cluster `ray` is connected to; None when not connected or not said."""
    initialized = getattr(ray, "is_initialized", None)
    if ray is None or (initialized is not None and not initialized()):
        return None
    context = getattr(ray, "get_runtime_context", None)
    try:
        address = str(context().gcs_address) if context is not None else ""
    except Exception:  # noqa: BLE001 (a cluster that went away meanwhile: the address is not known)
        return None
    return address or None


def cluster_words(address: str, ray: ModuleType | None = None) -> str:
    """How a message names the Ray cluster at launcher.ray_address `address`. `auto` names none a reader can use:
    it is the cluster this machine is part of (RAY_ADDRESS, else the one a `ray start` here runs), said with its
    GCS address once `ray` is connected to it."""
    if address != "auto":
        return f"the Ray cluster at {address}"
    env = os.environ.get("RAY_ADDRESS")
    how = f"RAY_ADDRESS={env}" if env else "RAY_ADDRESS is not set: the one a `ray start` on this machine runs"
    known = connected_address(ray)
    return (f"the Ray cluster this machine is part of (launcher.ray_address auto: {how})"
            + (f", at {known}" if known else ""))


def init_in_thread(ray: ModuleType, address: str, **kwargs: object) -> None:
    """ray.init(address=address, **kwargs), run in a helper thread; what it raised is raised here. A stop signal
    meanwhile raises here (config/ray_thread.py), ray_thread.cut_short() saying "connecting to CLUSTER" (as
    cluster_words names it). PdlaunchError when ray.init has not returned within INIT_TIMEOUT_S."""
    global _tried
    _tried = True
    worker_log = logging.getLogger("ray._private.worker")
    worker_log.addFilter(_drop_no_sigterm_warning)  # kept while ray.init runs (a stop leaves it running)
    cluster = cluster_words(address)
    status = "ray status" + (f" --address {address}" if address != "auto" else "")
    late = PdlaunchError(f"ray.init did not return within {INIT_TIMEOUT_S:.0f}s of connecting to {cluster}",
                         field=FIELD, hint=f"check the head with `{status}` there; it may be overloaded or stuck")
    try:
        in_ray_thread(ray, lambda: ray.init(address=address, **kwargs), f"connecting to {cluster}",
                      INIT_TIMEOUT_S, late, name="ray.init")
    finally:
        if cut_short() is None:  # ray.init returned (or raised): its warnings are its own again
            worker_log.removeFilter(_drop_no_sigterm_warning)
            _reclaim_signals()


def tried() -> bool:
    """Whether this process called ray.init (connected, or tried to): it has a driver to take off the cluster."""
    return _tried
