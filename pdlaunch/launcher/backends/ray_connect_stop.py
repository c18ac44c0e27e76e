"""A stop signal (Ctrl-C, SIGTERM, SIGHUP) that arrives while this process connects to a Ray cluster: the one
place that ends the process then, for `pdlaunch serve` (exit 0, as any stop) and `pdlaunch check-config` (exit
130: no verdict). Its callers: cli.py `_unless_stopped` (the connect of the config loader, serve's first ray.init)
and launcher/backends/ray.py `_connected` (the deployment's own connect).

ray.init runs in a helper thread (config/ray_init.py: an exception raised inside it by a signal's handler can
hang the process for good), so the stop is seen at once, in the main thread, while ray.init still runs. Tearing
a ray.init down half-way (ray.shutdown, or the atexit hook Ray registers, which a normal interpreter exit runs)
can crash inside Ray's C++ core (SIGSEGV). So the process leaves with os._exit, after one line saying what was
stopped, never through ray.shutdown: the GCS sees the driver's connection close and marks its job dead. A
connect that did complete is ended with ray.shutdown first, the driver leaving the cluster as it would at any
other stop.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import NoReturn

from rich.console import Console

from pdlaunch.config.ray_cluster import connecting_to


def leave_stopped_connect(console: Console, signal_name: str, address: str, exit_code: int) -> NoReturn:
    """`signal_name` arrived while this process connected to the Ray cluster at `address` (nothing placed there
    yet): one line says so, then the process ends at once with `exit_code`. A second stop signal meanwhile (a
    completed connect's ray.shutdown may take seconds) ends it at once too."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) != signal.SIG_IGN:  # nohup's SIGHUP stays ignored
                signal.signal(sig, lambda *_: os._exit(exit_code))
    ray = sys.modules.get("ray")
    if connecting_to() is None and ray is not None and ray.is_initialized():
        ray.shutdown()  # the connect completed: the driver leaves the cluster (a cut-short one never gets here)
    console.print(f"{signal_name} received while connecting to the Ray cluster at {address}; stopping (nothing was "
                  "placed on the cluster)", highlight=False, soft_wrap=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
