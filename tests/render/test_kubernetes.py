"""`pdlaunch render kubernetes`: every example config renders, the core objects pass the Kubernetes
JSON schemas (kubernetes-validate, offline), the LeaderWorkerSets pass the typed LWS model, and what
the pods would run parses (their instance spec, the deployment they read, the proxy's instances)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from pdlaunch.cli import app
from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.render.lws import LeaderWorkerSet

kubernetes_validate = pytest.importorskip("kubernetes_validate")

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").rglob("*.yaml"))
K8S_VERSION = "1.30.0"
# Prefill TP 1 feeds decode TP 2 there: resharding pulls, which auto would not resolve between pods on CUDA.
EXAMPLE_ARGS = {"gpu-2p1d-tp2-decode.yaml": ["--transfer-mode", "pull"]}
runner = CliRunner()


def render(tmp_path: Path, *args: str) -> list[dict[str, Any]]:
    out = tmp_path / "manifests"
    result = runner.invoke(app, ["render", "kubernetes", *args, "--out", str(out), "--image", "pdlaunch:test"])
    assert result.exit_code == 0, result.output
    return [yaml.safe_load(path.read_text()) for path in sorted(out.glob("*.yaml"))]


def check_schemas(manifest: dict[str, Any]) -> None:
    """Core objects against the Kubernetes schema; a LeaderWorkerSet against the LWS model, and its
    pod templates against the core PodTemplate schema."""
    if manifest["kind"] != "LeaderWorkerSet":
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
        return
    lws = LeaderWorkerSet.model_validate(manifest)
    assert lws.manifest() == manifest  # nothing the model does not know
    template = lws.spec.leader_worker_template
    for pod in (template.leader_template, template.worker_template):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                      "metadata": {"name": lws.metadata.name}, "template": pod},
                                     K8S_VERSION, strict=True)


def expand(text: str, env: dict[str, str]) -> str:
    """What the kubelet does with $(VAR) in a container's args."""
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], text)


def by_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def container(pod: dict[str, Any]) -> dict[str, Any]:
    (only,) = pod["spec"]["containers"]
    return only


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_renders_valid_manifests(tmp_path: Path, example: Path) -> None:
    manifests = render(tmp_path, str(example), *EXAMPLE_ARGS.get(example.name, []))
    for manifest in manifests:
        check_schemas(manifest)
    kinds = [m["kind"] for m in manifests]
    assert kinds[0] == "Secret" and kinds[-2:] == ["Deployment", "Service"]
    cfg = DeploymentConfig.model_validate(yaml.safe_load(example.read_text()) | {})
    groups = [g for g in cfg.instances if g.count > 0]
    assert len(by_kind(manifests, "LeaderWorkerSet")) == len(groups)
    roles = {g.role for g in groups}
    assert {m["metadata"]["name"] for m in by_kind(manifests, "Service")} == \
        {f"pdlaunch-{role}" for role in roles} | {"pdlaunch-proxy"}


def test_pd_pods_advertise_their_pod_address_and_read_the_secret(tmp_path: Path) -> None:
    example = next(p for p in EXAMPLES if p.name == "gpu-2p1d-tp2-decode.yaml")
    manifests = render(tmp_path, str(example), *EXAMPLE_ARGS[example.name])
    secret = by_kind(manifests, "Secret")[0]["stringData"]
    pod_cfg = DeploymentConfig.model_validate_json(secret["deployment.json"])
    assert pod_cfg.security.deployment_secret == secret["deployment-secret"]
    assert pod_cfg.kv_transfer.side_channel_host == "0.0.0.0" and pod_cfg.parallel.nodes == []

    prefill, decode = by_kind(manifests, "LeaderWorkerSet")
    assert prefill["spec"]["replicas"] == 2 and decode["spec"]["replicas"] == 1
    engine = container(decode["spec"]["leaderWorkerTemplate"]["leaderTemplate"])
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in engine["env"] if "valueFrom" in e}
    assert env["POD_IP"] == "status.podIP"
    assert engine["command"] == ["python", "-m", "pdlaunch.server"]
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert engine["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    spec_json = engine["args"][engine["args"].index("--instance") + 1]
    spec = InstanceSpec.model_validate_json(expand(spec_json, {"POD_IP": "10.1.2.3", "POD_NAME": "d-0",
                                                               "POD_UID": "u1"}))
    assert (spec.role, spec.host, spec.port, spec.tp, spec.devices) == ("decode", "10.1.2.3", 8200, 2, [0, 1])
    assert spec.engine_id.endswith("-d-0-u1")
    ports = {p["name"]: p["containerPort"] for p in engine["ports"]}
    assert ports["http"] == 8200 and spec.side_channel_port in ports.values()

    proxy = container(by_kind(manifests, "Deployment")[0]["spec"]["template"])
    args = proxy["args"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--prefill"] == [
        "prefill-0-0=http://pdlaunch-prefill-0-0.pdlaunch-prefill-0:8100",
        "prefill-0-1=http://pdlaunch-prefill-0-1.pdlaunch-prefill-0:8100"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--decode"] == [
        "decode-1-0=http://pdlaunch-decode-1-0.pdlaunch-decode-1:8200"]
    assert {"name": "PDLAUNCH_DEPLOYMENT_SECRET",
            "valueFrom": {"secretKeyRef": {"name": "pdlaunch-deployment", "key": "deployment-secret"}}} in proxy["env"]
    assert not any("secret" in a.lower() for a in args)


def test_a_tp_group_larger_than_a_node_is_one_pod_per_rank(tmp_path: Path) -> None:
    manifests = render(tmp_path, "--model", "tiny", "--device", "cuda", "--decode-tp", "4", "--gpus-per-node", "2",
                       "--api-key", "sk-test-key", "--transfer-mode", "pull")
    for manifest in manifests:
        check_schemas(manifest)
    decode = next(m for m in by_kind(manifests, "LeaderWorkerSet") if "decode" in m["metadata"]["name"])
    template = decode["spec"]["leaderWorkerTemplate"]
    assert template["size"] == 4
    leader, worker = container(template["leaderTemplate"]), container(template["workerTemplate"])
    assert leader["resources"]["limits"]["nvidia.com/gpu"] == "1"
    placement_env = next(e["value"] for e in leader["env"] if e["name"] == "PDLAUNCH_TP_PLACEMENT")
    placement = json.loads(expand(placement_env, {"POD_IP": "10.0.0.5", "POD_NAME": "pd-0"}))
    assert placement == {"nodes": [0, 1, 2, 3], "hosts": ["10.0.0.5", "pd-0-1", "pd-0-2", "pd-0-3"]}
    assert worker["command"] == ["python", "-m", "pdlaunch.distributed.remote_rank"]
    args = worker["args"]
    assert args[args.index("--rank") + 1] == "$(LWS_WORKER_INDEX)"
    assert json.loads(args[args.index("--placement") + 1])["hosts"][0] == "$(LWS_LEADER_ADDRESS)"
    assert "readinessProbe" not in worker
    secret = by_kind(manifests, "Secret")[0]["stringData"]
    assert secret["api-key"] == "sk-test-key"


def test_the_lws_model_refuses_what_the_api_does_not_have() -> None:
    good = {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet", "metadata": {"name": "x"},
            "spec": {"replicas": 1, "leaderWorkerTemplate": {"size": 2, "workerTemplate": {}}}}
    LeaderWorkerSet.model_validate(good)
    with pytest.raises(ValidationError, match="groupSize"):
        LeaderWorkerSet.model_validate(good | {"spec": {"leaderWorkerTemplate": {
            "groupSize": 2, "workerTemplate": {}}}})
    with pytest.raises(ValidationError, match="restartPolicy"):
        LeaderWorkerSet.model_validate(good | {"spec": {"leaderWorkerTemplate": {
            "restartPolicy": "Always", "workerTemplate": {}}}})


def test_errors_are_one_line_each(tmp_path: Path) -> None:
    result = runner.invoke(app, ["render", "kubernetes", "--model", "tiny", "--name", "Bad_Name", "--out",
                                 str(tmp_path), "--image", "x"])
    assert result.exit_code == 1 and "--name" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["render", "kubernetes", "--model", "tiny", "--prefill", "0", "--out",
                                 str(tmp_path), "--image", "x"])
    assert result.exit_code == 1 and "no prefill instance" in result.output


def test_the_rendered_proxy_gets_the_proxy_settings_the_local_launcher_passes(tmp_path: Path) -> None:
    from pdlaunch.launcher.child_commands import proxy_argv
    from pdlaunch.proxy.__main__ import parse_args

    example = next(p for p in EXAMPLES if p.name == "gpu-2p1d-tp2-decode.yaml")
    raw = yaml.safe_load(example.read_text())
    raw["proxy"].update({"health_timeout_seconds": 7.5, "prefill_timeout_seconds": 12.0, "migration_limit": 3})
    raw["kv_transfer"].update({"load_failure_policy": "fail", "transfer_mode": "pull"})
    config = tmp_path / "deployment.yaml"
    config.write_text(yaml.safe_dump(raw))
    proxy = container(by_kind(render(tmp_path, str(config)), "Deployment")[0]["spec"]["template"])
    rendered = vars(parse_args(proxy["args"]))
    local = vars(parse_args(proxy_argv(DeploymentConfig.model_validate(raw), "127.0.0.1", 8000, 5.0, [])[3:]
                            + ["--colocated", "http://x:1"]))
    for key in ("health_timeout", "prefill_timeout", "load_failure_policy", "migration_limit", "request_timeout",
                "routing_policy", "max_request_bytes", "disaggregate_min_tokens"):
        assert rendered[key] == local[key], key
    assert (rendered["health_timeout"], rendered["prefill_timeout"], rendered["migration_limit"],
            rendered["load_failure_policy"]) == (7.5, 12.0, 3, "fail")
