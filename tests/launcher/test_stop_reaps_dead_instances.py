"""Deployment.stop drains the proxy before it stops the instances, but an instance that is already dead, or dies while
the proxy drains, is reaped at once: what is left of its process group (a TP worker holding its GPU memory) is
SIGKILLed and its directory removed then, not once the drain (up to drain_timeout_s) is over. Real processes: a proxy
that drains until the test lets it go, instances whose leader starts a worker in its group (test_group_at_reaping)."""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
from pathlib import Path

from rich.console import Console

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.launcher.deployment import Deployment
from pdlaunch.launcher.process import ChildProcess
from tests.launcher.test_group_at_reaping import _gone, _leader, _wait_gone, _worker_pid
from tests.serving.helpers import wait_for

# A proxy whose drain lasts until the test lets it go: it notes the SIGTERM and exits once the release file exists.
DRAINING_PROXY = """
import pathlib, signal, sys, time
termed, release = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
signal.signal(signal.SIGTERM, lambda *_: termed.write_text("term"))
print("up", flush=True)
while not release.exists():
    time.sleep(0.05)
"""


def test_a_stop_reaps_dead_instances_at_once_not_after_the_proxy_drain(tmp_path: Path) -> None:
    cfg = DeploymentConfig.model_validate(
        {"device": "cpu", "colocated": True, "instances": [{"role": "colocated"}], "proxy": {"port": 0}}
    )
    deployment = Deployment(cfg, Console(file=io.StringIO()), log_dir=tmp_path / "logs", drain_timeout_s=300.0)
    deployment._log_lock.acquire(deployment.proxy_url)  # noqa: SLF001  (what start() takes first)
    termed, release = tmp_path / "proxy-termed", tmp_path / "proxy-release"
    proxy = ChildProcess(
        "proxy", [sys.executable, "-c", DRAINING_PROXY, str(termed), str(release)], tmp_path / "proxy.log"
    )
    dead = _leader(tmp_path, "prefill-0", "exit")  # died before the stop
    dying = _leader(tmp_path, "decode-0", "sleep")  # dies while the proxy drains
    alive = ChildProcess("decode-1", [sys.executable, "-c", "import time; time.sleep(300)"], tmp_path / "decode-1.log")
    deployment.proxy, deployment.instances = proxy, [dead, dying, alive]
    stopper: threading.Thread | None = None
    try:
        for child in (proxy, dead, dying, alive):
            child.start()
        wait_for(lambda: "up" in proxy.log_path.read_text(), "the proxy to catch SIGTERM", 60)
        dead_worker, dying_worker = _worker_pid(dead), _worker_pid(dying)
        dead_dir = dead.tmp_dir
        wait_for(lambda: dead.poll() is not None, "prefill-0 to exit", 30)
        assert not _gone(dead_worker) and dead_dir is not None and dead_dir.is_dir()  # its leader's exit alone

        stopper = threading.Thread(target=deployment.stop, daemon=True)
        stopper.start()
        wait_for(termed.exists, "the proxy to get SIGTERM", 60)
        _wait_gone(dead_worker)
        assert not dead_dir.exists()
        os.kill(dying.pid or 0, signal.SIGKILL)  # decode-0's leader dies during the drain
        _wait_gone(dying_worker)
        assert stopper.is_alive() and proxy.running, "the drain ended first: the test proves nothing"
        assert alive.running  # the live instances are stopped after the drain, as before

        release.write_text("go")  # the drain ends: the rest of the stop is prompt
        stopper.join(30)
        assert not stopper.is_alive(), "the stop did not end within 30 s of the proxy's drain"
        assert all(child.poll() is not None for child in (proxy, dead, dying, alive))
        assert deployment.left_running == []
    finally:
        release.write_text("go")
        if stopper is not None:
            stopper.join(60)
        for child in (proxy, dead, dying, alive):
            child.stop(0.0)
