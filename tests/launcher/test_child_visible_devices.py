"""An instance's CUDA_VISIBLE_DEVICES under a launcher that runs with one of its own (a shared host:
`CUDA_VISIBLE_DEVICES=1 pdlaunch serve ...`): the launcher numbers the devices it sees from 0, and an instance
placed on its device i must get the i-th entry of the launcher's list, not physical GPU i. Before, two deployments
started with CUDA_VISIBLE_DEVICES=0 and =1 both ran on GPU 0 (the second ran out of memory at start).

No GPU is needed: the host's GPU count is patched (pdlaunch/memory/host_devices.py).
"""

from __future__ import annotations

import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.rules.security import SECRET_ENV
from pdlaunch.launcher.plan import plan_deployment
from pdlaunch.memory import host_devices
from pdlaunch.memory.host_devices import child_visible_devices

SECRET = "child-visible-devices-secret-0123456"


def test_a_child_gets_the_launchers_own_device_names() -> None:
    assert child_visible_devices([0, 1], {}) == "0,1"  # no list of its own: the host's numbering
    assert child_visible_devices([0], {"CUDA_VISIBLE_DEVICES": "1"}) == "1"
    assert child_visible_devices([1, 0], {"CUDA_VISIBLE_DEVICES": "4, 6"}) == "6,4"
    uuids = "GPU-8a1b2c3d-0000-1111-2222-333344445555,GPU-9f8e7d6c-0000-1111-2222-333344445555"
    assert child_visible_devices([1], {"CUDA_VISIBLE_DEVICES": uuids}) == uuids.split(",")[1]
    assert child_visible_devices([], {"CUDA_VISIBLE_DEVICES": "3"}) == ""


@pytest.mark.parametrize("visible,expected", [(None, ["0", "1"]), ("1,3", ["1", "3"]), ("5,2", ["5", "2"])])
def test_each_local_instance_runs_on_the_gpu_the_launcher_was_given(
        monkeypatch: pytest.MonkeyPatch, visible: str | None, expected: list[str]) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(host_devices, "cuda_available", lambda: True)
    monkeypatch.setattr(host_devices, "device_count", lambda: 2)
    monkeypatch.setattr(host_devices, "device_total_bytes", lambda index=0: 80 << 30)
    cfg = DeploymentConfig.model_validate({
        "device": "cuda", "model": {"path": "tiny"}, "security": {"deployment_secret": SECRET},
        "instances": [{"role": "prefill"}, {"role": "decode"}]})
    cfg.proxy.port = 0  # picked free: other tests run next to this one
    plan = plan_deployment(cfg)
    assert [i.env["CUDA_VISIBLE_DEVICES"] for i in plan.local] == expected
    assert [i.spec.devices for i in plan.local] == [[0], [0]]  # each sees its one device as cuda:0
