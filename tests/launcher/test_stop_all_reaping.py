"""stop_all (every instance at a deployment's stop, the SLURM steps): a child that ended before the others is reaped
as the supervisor reaps one (Supervisor._ended): what is left of its process group (a grandchild: a TP worker) is
SIGKILLed as soon as its leader's exit is seen, not after the wait for the others (up to the whole term timeout)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from pdlaunch.launcher.process import ChildProcess, stop_all
from tests.launcher.test_group_at_reaping import LEADER, _gone, _wait_gone, _worker_pid
from tests.serving.helpers import wait_for

# Ignores SIGTERM (a drain that takes its whole term timeout), says so once it does.
SLOW = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ignoring SIGTERM", flush=True)
time.sleep(600)
"""


def test_a_dead_childs_group_is_killed_while_stop_all_still_waits_for_the_others(tmp_path: Path) -> None:
    slow = ChildProcess("decode-0", [sys.executable, "-c", SLOW], tmp_path / "decode-0.log")
    dead = ChildProcess("prefill-0", [sys.executable, "-c", LEADER, "exit"], tmp_path / "prefill-0.log",
                        tmp_dir_flag="--tmp-dir")
    slow.start()
    dead.start()
    hurry = threading.Event()
    stopper: threading.Thread | None = None
    try:
        wait_for(lambda: "ignoring SIGTERM" in slow.log_path.read_text(), "decode-0 to ignore SIGTERM", 60)
        worker = _worker_pid(dead)
        wait_for(lambda: dead.poll() is not None, "prefill-0 to exit", 30)
        assert not _gone(worker)  # its leader's exit alone leaves it

        stopper = threading.Thread(target=stop_all, args=([slow, dead], 300.0, hurry.is_set), daemon=True)
        stopper.start()
        _wait_gone(worker)
        assert stopper.is_alive(), "stop_all ended before decode-0's term timeout: the test proves nothing"
        assert slow.running
    finally:
        hurry.set()  # a second Ctrl-C: the rest is killed at once
        if stopper is not None:
            stopper.join(60)
        slow.stop(0.0)
        dead.stop(0.0)
    assert stopper is not None and not stopper.is_alive()
    assert not slow.running
