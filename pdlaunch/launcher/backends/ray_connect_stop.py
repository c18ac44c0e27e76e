"""How a process that used Ray leaves it: after a stop signal that cut a Ray call short, and at the command's end.

A stop signal (Ctrl-C, SIGTERM, SIGHUP) while a Ray call runs (the connect, listing the nodes, the GPU probe: in a
helper thread, config/ray_thread.py) is seen at once in the main thread while the call still runs. Tearing Ray down
under it (ray.shutdown, or the atexit hook Ray registers, which a normal interpreter exit runs) can crash inside
Ray's C++ core (SIGSEGV). So `leave_stopped_ray` ends the process with os._exit, after one line saying what was
stopped, never through ray.shutdown: the GCS sees the driver's connection close and marks its job dead. Its callers:
cli.py `_unless_stopped` (the config loader's and check-config's Ray calls) and launcher/backends/ray.py
`_connected` (the deployment's own). `pdlaunch serve` then exits 0, as at any stop; `check-config` 130 (no verdict).

At the command's end (`leave_ray_cluster`: check-config's verdict printed, serve stopped), the driver leaves the
cluster here, with ray.shutdown in a helper thread, and Ray's atexit hook is dropped: it sleeps 0.5 s first, and a
Ctrl-C there printed "Exception ignored in atexit callback" and a KeyboardInterrupt traceback. A stop signal
meanwhile ends the process at once, after one line, with the command's status: check-config's verdict stands (it was
printed whole), serve's 0 stays 0. The process then ends with os._exit, its output flushed, rather than through the
interpreter's exit, which puts the default handlers back before it is done. A completed connect that a stop cut
short elsewhere is left the same way.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping
from typing import NoReturn

from rich.console import Console

from pdlaunch.config.flag_terms import in_flag_terms
from pdlaunch.config.ray_init import tried
from pdlaunch.config.ray_thread import cut_short, in_ray_thread
from pdlaunch.errors import PdlaunchError

SHUTDOWN_TIMEOUT_S = 30.0  # ray.shutdown of a driver: a disconnect from the GCS, within a second when it answers
LEAVING = "disconnecting from the Ray cluster"


def _exit_on_stop(exit_code: int, doing: str) -> None:
    """From now to the process's end, a stop signal ends it at once with `exit_code`, after one line (written
    straight to fd 2: the handler may run inside a print of the main thread's)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def leave(signum: int, _: object) -> None:
        os.write(2, f"{signal.Signals(signum).name} received while {doing}; stopping\n".encode())
        os._exit(exit_code)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) != signal.SIG_IGN:  # nohup's SIGHUP stays ignored
            signal.signal(sig, leave)


def _flushed_exit(exit_code: int) -> NoReturn:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def _shutdown(console: Console, exit_code: int) -> None:
    """ray.shutdown of a completed connect, in a helper thread (bounded); a stop meanwhile ends the process
    (_exit_on_stop, installed first). One that does not finish in time: the process leaves without it."""
    ray = sys.modules.get("ray")
    if ray is None:
        return
    atexit.unregister(ray.shutdown)  # done here; Ray's hook would sleep 0.5 s first, deaf to our handlers
    if cut_short() is not None or not ray.is_initialized():
        return
    late = PdlaunchError(f"ray.shutdown did not return within {SHUTDOWN_TIMEOUT_S:g}s", field="launcher.ray_address")
    try:
        in_ray_thread(ray, ray.shutdown, LEAVING, SHUTDOWN_TIMEOUT_S, late, name="ray.shutdown")
    except Exception as exc:  # noqa: BLE001 (the bound, or whatever Ray's disconnect raised: one line, not a traceback)
        why = exc.message if isinstance(exc, PdlaunchError) else f"ray.shutdown failed: {type(exc).__name__}: {exc}"
        console.print(f"{why}; leaving without it (the cluster sees the driver gone)", highlight=False,
                      markup=False, soft_wrap=True)
        _flushed_exit(exit_code)


def leave_stopped_ray(console: Console, signal_name: str, doing: str, exit_code: int,
                      flags: Mapping[str, str]) -> NoReturn:
    """`signal_name` arrived while this process was `doing` (e.g. "connecting to the Ray cluster at ADDRESS";
    nothing placed there yet): one line says so, in the terms the user typed (`flags`: config path -> the flag that
    set it; `--ray-address auto`, not launcher.ray_address, when the flag set it), then the process ends at once with
    `exit_code`. A Ray call still running is not torn down; a completed connect is left with ray.shutdown first. A
    second stop signal meanwhile ends the process at once too."""
    _exit_on_stop(exit_code, LEAVING)
    _shutdown(console, exit_code)
    # markup=False: an address such as [fd00::5]:6379 read as a markup tag was dropped from the line
    console.print(f"{signal_name} received while {in_flag_terms(doing, flags)}; stopping (nothing was placed on the "
                  "cluster)", highlight=False, markup=False, soft_wrap=True)
    _flushed_exit(exit_code)


def leave_ray_cluster(console: Console, exit_code: int) -> None:
    """The command is done and exits with `exit_code`: when it called ray.init, the driver leaves the cluster now (a Ray
    call still running, its wait ended by its bound, is not torn down), a stop signal meanwhile ending the process
    at once with `exit_code`, and then the process ends with os._exit: the interpreter's own exit puts the default
    handlers back before it is done (a stop there ended the process by the signal, -2 or -15, in 4 of 30 signals
    sent at random moments after the verdict)."""
    if not tried():
        return
    _exit_on_stop(exit_code, LEAVING)
    _shutdown(console, exit_code)
    _flushed_exit(exit_code)
