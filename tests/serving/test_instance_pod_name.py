"""An instance given a pod name (InstanceSpec.pod: `pdlaunch render kubernetes` passes its leader pod's) is named
after it, in /info and in its log lines, so two pods of one group no longer both say `<role>-0`. A pod name the
kubelet did not expand, or one that is no pod name (the name goes into log lines and file names), is refused at the
command line, naming the field, by the instance's server and by a remote TP rank alike."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from pdlaunch.distributed import remote_rank
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.server import __main__ as server
from tests.serving.helpers import tiny_colocated, wait_for

POD = "pd-colocated-0-1"
START_TIMEOUT_S = 180.0  # the tiny model on CPU, on a loaded 2-core machine


def test_an_instance_named_after_its_pod_says_so_in_info_and_its_log_lines(tmp_path: Path) -> None:
    deployment = tmp_path / "deployment.json"
    deployment.write_text(tiny_colocated(256).model_dump_json())
    port = PortAllocator("127.0.0.1").free("the test instance")
    spec = {"role": "colocated", "port": port, "engine_id": "pod-named", "pod": POD}
    log = tmp_path / "instance.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pdlaunch.server", "--deployment", str(deployment),
                                 "--instance", json.dumps(spec), "--parent-pid", str(os.getpid())],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, f"the instance exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
        try:
            return httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, "the instance to serve the tiny model", START_TIMEOUT_S, poll=0.2)
        info = httpx.get(f"{url}/info", timeout=10, trust_env=False).json()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert info["name"] == POD
    assert f" {POD} pdlaunch.server: starting {POD} on 127.0.0.1:{port}" in log.read_text()


# Each entry point that reads an --instance in a pod, and the rest of its arguments.
ENTRIES = {"server": (server.parse_args, []),
           "remote_rank": (remote_rank.parse_args, ["--rank", "1", "--placement", "{}"])}


@pytest.mark.parametrize("pod", ["$(POD_NAME)", "", "../decode-0", "Decode-0", "decode-0.log", "d" * 64])
@pytest.mark.parametrize("entry", list(ENTRIES))
def test_a_pod_name_that_is_no_pod_name_is_refused_naming_the_field(pod: str, entry: str,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    parse, rest = ENTRIES[entry]
    spec = json.dumps({"role": "decode", "port": 8200, "engine_id": "e", "pod": pod})
    with pytest.raises(SystemExit) as exited:
        parse(["--deployment", "deployment.json", "--instance", spec, *rest])
    assert exited.value.code == 1
    error = capsys.readouterr().err
    assert f"error: argument --instance: pod: {pod!r} is not a pod name" in error and "Traceback" not in error
    assert ("the kubelet left as it is" in error) == pod.startswith("$(")
