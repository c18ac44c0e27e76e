"""One instance process, `python -m pdlaunch.server` as the launcher starts it, for tests that need the real process:
its signals, its watchdog, its log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.launcher.ports import PortAllocator
from tests.serving.helpers import wait_for

START_TIMEOUT_S = 180.0  # the tiny model on CPU, on a loaded 2-core machine
# A launcher that starts the instance as its child, as `pdlaunch serve` does, and waits for it.
LAUNCHER = "import os, subprocess, sys; sys.exit(subprocess.call(sys.argv[1:] + ['--parent-pid', str(os.getpid())]))"


@contextmanager
def instance_process(tmp_path: Path, cfg: DeploymentConfig, spec: dict[str, Any], launcher: bool = False,
                     ) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """The instance `spec` (InstanceSpec's fields; a free port added) of `cfg`: (its URL, the process, its log) once
    /health answers; its whole session killed on exit. Its parent is this process (--parent-pid), or with `launcher`
    a launcher process (the one returned) whose child the instance is."""
    deployment = tmp_path / "deployment.json"
    deployment.write_text(cfg.model_dump_json())
    port = PortAllocator("127.0.0.1").free("the test instance")
    log = tmp_path / "instance.log"
    command = [sys.executable, "-m", "pdlaunch.server", "--deployment", str(deployment),
               "--instance", json.dumps({**spec, "port": port})]
    command = [sys.executable, "-c", LAUNCHER, *command] if launcher else [*command, "--parent-pid", str(os.getpid())]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, f"the instance exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
        try:
            return httpx.get(f"{url}/health", timeout=5, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, "the instance to serve the tiny model", START_TIMEOUT_S, poll=0.2)
        yield url, proc, log
    finally:  # its whole session: the instance too, where the launcher is gone
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
