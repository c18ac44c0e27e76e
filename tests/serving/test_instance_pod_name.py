"""An instance given a pod name (InstanceSpec.pod: `pdlaunch render kubernetes` passes its leader pod's) is named
after it, in /info and in its log lines, so two pods of one group no longer both say `<role>-0`. A pod name the
kubelet did not expand, or one that is no pod name (the name goes into log lines and file names), is refused at the
command line, naming the field, by the instance's server and by a remote TP rank alike."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from pdlaunch.distributed import remote_rank
from pdlaunch.server import __main__ as server
from tests.serving.helpers import tiny_colocated
from tests.serving.instance_process import instance_process

POD = "pd-colocated-0-1"


def test_an_instance_named_after_its_pod_says_so_in_info_and_its_log_lines(tmp_path: Path) -> None:
    spec = {"role": "colocated", "engine_id": "pod-named", "pod": POD}
    with instance_process(tmp_path, tiny_colocated(256), spec) as (url, _, log):
        info = httpx.get(f"{url}/info", timeout=10, trust_env=False).json()
    assert info["name"] == POD
    port = url.rsplit(":", 1)[1]
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
