"""The Kubernetes manifests give a TP group's ranks longer to find one another than the launcher's default: a worker
pod may still be pulling a multi-GB image or waiting to be scheduled when its leader starts, and a leader that gave
up after 120 s made LWS recreate the whole group, possibly forever. The pods read parallel.rendezvous_timeout_seconds
from the deployment Secret: POD_RENDEZVOUS_TIMEOUT_S unless the config sets it, the config's value when it does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.render.kubernetes import POD_RENDEZVOUS_TIMEOUT_S
from tests.config.cli_helpers import invoke

# decode TP 4 over pods of 2 GPUs: ranks in worker pods (pull: the TP 1 prefill feeds it by resharding)
ARGS = ["--model", "tiny", "--device", "cuda", "--decode-tp", "4", "--gpus-per-node", "2", "--image", "pdlaunch:test"]


def pod_deployment(tmp_path: Path, yaml_text: str) -> DeploymentConfig:
    """The deployment every pod reads (the Secret's deployment.json) of the render of `yaml_text`."""
    config = tmp_path / "deploy.yaml"
    config.write_text(yaml_text)
    out = tmp_path / "out"
    result = invoke(["render", "kubernetes", str(config), *ARGS, "--out", str(out)])
    assert result.exit_code == 0, result.output
    (secret,) = [m for m in (yaml.safe_load(p.read_text()) for p in out.glob("*.yaml")) if m["kind"] == "Secret"]
    return DeploymentConfig.model_validate(json.loads(secret["stringData"]["deployment.json"]))


def test_the_pods_wait_longer_than_the_launcher_by_default(tmp_path: Path) -> None:
    assert DeploymentConfig().parallel.rendezvous_timeout_seconds < POD_RENDEZVOUS_TIMEOUT_S == 900.0
    pods = pod_deployment(tmp_path, "kv_transfer: {transfer_mode: pull}\n")
    assert pods.parallel.rendezvous_timeout_seconds == POD_RENDEZVOUS_TIMEOUT_S


@pytest.mark.parametrize("given", [120.0, 2400.0])
def test_a_value_the_config_sets_is_kept(tmp_path: Path, given: float) -> None:
    """Even the launcher's default, once written out: the user chose it."""
    pods = pod_deployment(tmp_path, f"kv_transfer: {{transfer_mode: pull}}\nparallel: {{rendezvous_timeout_seconds: "
                                    f"{given}}}\n")
    assert pods.parallel.rendezvous_timeout_seconds == given
