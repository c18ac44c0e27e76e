"""A stop that is itself interrupted (a second Ctrl-C or SIGTERM where the handler raises, as in `pdlaunch smoke`
and `bench compare`) still ends every child: none serves on, holding its ports and GPU, after the launcher gave
up on it, and the log-dir lock is let go only once they are reaped."""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.launcher.deployment import Deployment
from pdlaunch.launcher.log_dir_lock import log_dir_holder
from pdlaunch.launcher.process import ChildProcess
from tests.serving.helpers import wait_for

# A proxy that is slow to drain: it notes the SIGTERM and runs on (up to 300 s).
SLOW_PROXY = """
import pathlib, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: pathlib.Path(sys.argv[1]).write_text("term"))
pathlib.Path(sys.argv[2]).write_text("up")
time.sleep(300)
"""


@pytest.fixture()
def interrupt_handler() -> Iterator[None]:
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_an_interrupt_while_the_proxy_drains_still_stops_the_instances(tmp_path: Path,
                                                                      interrupt_handler: None) -> None:
    cfg = DeploymentConfig.model_validate({"device": "cpu", "colocated": True, "instances": [{"role": "colocated"}],
                                           "proxy": {"port": 0}})
    deployment = Deployment(cfg, Console(file=io.StringIO()), log_dir=tmp_path / "logs", drain_timeout_s=60.0)
    deployment._log_lock.acquire(deployment.proxy_url)  # noqa: SLF001  (what start() takes first)
    termed, up = tmp_path / "proxy-termed", tmp_path / "proxy-up"
    proxy = ChildProcess("proxy", [sys.executable, "-c", SLOW_PROXY, str(termed), str(up)], tmp_path / "proxy.log")
    instance = ChildProcess("colocated-0", [sys.executable, "-c", "import time; time.sleep(300)"],
                            tmp_path / "colocated-0.log")
    deployment.proxy, deployment.instances = proxy, [instance]
    try:
        proxy.start()
        instance.start()
        wait_for(up.exists, "the proxy to catch SIGTERM", 60)

        def second_ctrl_c() -> None:
            wait_for(termed.exists, "the proxy to get SIGTERM", 60)
            os.kill(os.getpid(), signal.SIGINT)

        sender = threading.Thread(target=second_ctrl_c, daemon=True)
        sender.start()
        with pytest.raises(KeyboardInterrupt):
            deployment.stop()
        sender.join(60)
        assert proxy.poll() is not None, "the proxy runs on after the interrupted stop"
        assert instance.poll() is not None, "the instance runs on after the interrupted stop"
        assert log_dir_holder(tmp_path / "logs") is None
    finally:
        for child in (proxy, instance):
            child.stop(0.0)


def test_a_child_that_outlives_its_sigkill_is_named_not_called_reaped(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A process in an uninterruptible wait (a device, an NFS mount) lives on after SIGKILL: stop() dropped it
    after 10 s and serve said "stopped: all processes reaped". Such a process cannot be made here, so this
    instance's exit is hidden from the launcher; the stop must name it and serve must say so, exit 1."""
    from pdlaunch.launcher.serve import _say_stopped

    cfg = DeploymentConfig.model_validate({"device": "cpu", "colocated": True, "instances": [{"role": "colocated"}],
                                           "proxy": {"port": 0}})
    deployment = Deployment(cfg, Console(file=io.StringIO()), log_dir=tmp_path / "logs", drain_timeout_s=0.0)
    deployment._log_lock.acquire(deployment.proxy_url)  # noqa: SLF001  (what start() takes first)
    stuck = ChildProcess("colocated-0", [sys.executable, "-c", "import time; time.sleep(300)"],
                         tmp_path / "colocated-0.log")
    deployment.instances = [stuck]
    real_running, real_wait = ChildProcess.running, ChildProcess.wait
    monkeypatch.setattr(ChildProcess, "running", property(lambda c: c is stuck or real_running.fget(c)))
    monkeypatch.setattr(ChildProcess, "wait",
                        lambda c, timeout, hurry=None: c is not stuck and real_wait(c, timeout, hurry))
    try:
        stuck.start()
        deployment.stop(drain=False)
        assert deployment.left_running == [f"colocated-0 (pid {stuck.pid})"]
        out = io.StringIO()
        assert _say_stopped(Console(file=out, width=1000), deployment) == 1
        assert f"stopped, but colocated-0 (pid {stuck.pid}) still run(s) after SIGKILL" in out.getvalue()
        assert "all processes reaped" not in out.getvalue()
    finally:
        monkeypatch.undo()
        stuck.stop(0.0)
