"""An instance of `pdlaunch render kubernetes` is named after its leader pod, as `kubectl get pods` lists it (its
/info and log lines say that name): two replicas of one group have two names, where every pod used to say
`<role>-0`. The worker pods of a TP group spread over pods take the leader's name too, from the annotation LWS gives
them, so they derive the rank link's key as their rank 0 does; without that annotation they refuse to start."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from pdlaunch.cli import app
from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec, instance_spec_from_json
from pdlaunch.distributed.placement import link_authkey
from pdlaunch.errors import PdlaunchError
from pdlaunch.proxy.__main__ import parse_args
from pdlaunch.render.lws import LEADER_NAME_ANNOTATION

LEADER_NAME = f"metadata.annotations['{LEADER_NAME_ANNOTATION}']"


def _render(tmp_path: Path, *args: str) -> list[dict[str, Any]]:
    out = tmp_path / "manifests"
    result = CliRunner().invoke(app, ["render", "kubernetes", "--model", "tiny", *args, "--name", "pd",
                                      "--out", str(out), "--image", "pdlaunch:test"])
    assert result.exit_code == 0, result.output
    return [yaml.safe_load(path.read_text()) for path in sorted(out.glob("*.yaml"))]


def _spec(container: dict[str, Any], fields: dict[str, str]) -> InstanceSpec:
    """The InstanceSpec the container parses in a pod whose downward API gives `fields` (fieldPath -> value; an
    annotation the pod lacks reads as ""): its env, then its args, expanded as the kubelet does (a $(VAR) it has no
    value for stays as it is)."""
    env: dict[str, str] = {}

    def expand(text: str) -> str:
        return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), text)

    for item in container["env"]:
        ref = item.get("valueFrom", {}).get("fieldRef")
        if ref is not None:
            env[item["name"]] = fields.get(ref["fieldPath"], "")
        elif "value" in item:
            env[item["name"]] = expand(item["value"])
    args = container["args"]
    return instance_spec_from_json(expand(args[args.index("--instance") + 1]))


def _pod(name: str, leader: str | None = None) -> dict[str, str]:
    fields = {"status.podIP": "10.0.0.7", "metadata.name": name, "metadata.uid": f"uid-of-{name}"}
    return fields | ({LEADER_NAME: leader} if leader is not None else {})


def _containers(lws: dict[str, Any], template: str) -> dict[str, Any]:
    (container,) = lws["spec"]["leaderWorkerTemplate"][template]["spec"]["containers"]
    return container


def test_each_leader_pods_instance_is_named_after_its_pod(tmp_path: Path) -> None:
    manifests = _render(tmp_path, "--device", "cpu", "--prefill", "1", "--decode", "2")
    groups = {m["metadata"]["name"]: m for m in manifests if m["kind"] == "LeaderWorkerSet"}
    assert set(groups) == {"pd-prefill-0", "pd-decode-1"} and groups["pd-decode-1"]["spec"]["replicas"] == 2
    named = {}
    for lws_name, lws in groups.items():
        for k in range(lws["spec"]["replicas"]):  # LWS names leader pod k `<lws>-<k>`
            pod = f"{lws_name}-{k}"
            named[pod] = _spec(_containers(lws, "leaderTemplate"), _pod(pod)).name
    assert named == {pod: pod for pod in ("pd-prefill-0-0", "pd-decode-1-0", "pd-decode-1-1")}
    # The proxy's names for them are the pods' without the --name: `<role>-<group>-<k>`.
    proxy = next(m for m in manifests if m["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert {f"pd-{name}" for name in parse_args(proxy["args"]).engine_ids} == set(named)


def test_the_worker_pods_of_a_spread_tp_group_take_the_leaders_name_and_its_link_key(tmp_path: Path) -> None:
    manifests = _render(tmp_path, "--device", "cuda", "--decode-tp", "4", "--gpus-per-node", "2",
                        "--transfer-mode", "pull")
    secret = next(m for m in manifests if m["kind"] == "Secret")["stringData"]
    cfg = DeploymentConfig.model_validate_json(secret["deployment.json"])
    lws = next(m for m in manifests if m["kind"] == "LeaderWorkerSet" and m["metadata"]["name"] == "pd-decode-1")
    leader, worker = _containers(lws, "leaderTemplate"), _containers(lws, "workerTemplate")
    keys = {}
    for k in (0, 1):  # two replicas: each group's ranks share a key, which no other group's has
        rank0 = _spec(leader, _pod(f"pd-decode-1-{k}"))
        assert rank0.name == f"pd-decode-1-{k}" and rank0.master_port is not None
        for rank in (1, 2, 3):  # LWS names worker pod r `<leader pod>-<r>` and annotates it with the leader's name
            spec = _spec(worker, _pod(f"pd-decode-1-{k}-{rank}", leader=f"pd-decode-1-{k}"))
            assert spec.name == rank0.name
            assert link_authkey(cfg, spec.name, rank0.master_port) == link_authkey(cfg, rank0.name, rank0.master_port)
        keys[k] = link_authkey(cfg, rank0.name, rank0.master_port)
    assert keys[0] != keys[1]
    with pytest.raises(PdlaunchError, match=r"^pod: '' is not a pod name") as refused:
        _spec(worker, _pod("pd-decode-1-0-1"))  # a worker pod without LWS's annotation
    assert refused.value.field == "pod"
