"""The Services of `pdlaunch render kubernetes` reach what they select: every port of a Service leads, in each
pod its selector matches, to a port that pod's container listens on (the instance's HTTP server, the proxy's),
also for a role whose groups bind different HTTP ports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.config.cli_helpers import invoke

# Two prefill groups: the port plan gives them the HTTP ports 8100 and 8300 (8100 + 100 x group).
TWO_PREFILL_GROUPS = """
model: {path: tiny}
instances:
  - {role: prefill, count: 2}
  - {role: decode, count: 1}
  - {role: prefill, count: 1}
"""


def rendered(tmp_path: Path, config: str) -> list[dict[str, Any]]:
    path = tmp_path / "deployment.yaml"
    path.write_text(config)
    out = tmp_path / "manifests"
    result = invoke(["render", "kubernetes", str(path), "--out", str(out), "--image", "pdlaunch:test"])
    assert result.exit_code == 0, result.output
    return [yaml.safe_load(p.read_text()) for p in sorted(out.glob("*.yaml"))]


def pod_templates(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every pod template: the LeaderWorkerSets' leader and worker ones, the Deployment's."""
    found = []
    for manifest in manifests:
        if manifest["kind"] == "LeaderWorkerSet":
            template = manifest["spec"]["leaderWorkerTemplate"]
            found += [template["workerTemplate"]] + ([template["leaderTemplate"]] if "leaderTemplate" in template
                                                     else [])
        elif manifest["kind"] == "Deployment":
            found.append(manifest["spec"]["template"])
    return found


def target(port: dict[str, Any], container: dict[str, Any]) -> int | None:
    """The container port a Service port's targetPort leads to in this pod (None: none, the connection fails)."""
    wanted = port["targetPort"]
    for declared in container["ports"]:
        if wanted in (declared["name"], declared["containerPort"]):
            return int(declared["containerPort"])
    return None


def test_every_service_port_leads_to_the_http_port_of_each_pod_it_selects(tmp_path: Path) -> None:
    manifests = rendered(tmp_path, TWO_PREFILL_GROUPS)
    pods = pod_templates(manifests)
    services = [m for m in manifests if m["kind"] == "Service"]
    prefill = next(s for s in services if s["metadata"]["name"] == "pdlaunch-prefill")
    assert sorted(p["port"] for p in prefill["spec"]["ports"]) == [8100, 8300]
    for service in services:
        selector = service["spec"]["selector"]
        selected = [p for p in pods if selector.items() <= p["metadata"]["labels"].items()]
        assert selected, service["metadata"]["name"]
        for pod in selected:
            (container,) = pod["spec"]["containers"]
            http = next(p["containerPort"] for p in container["ports"] if p["name"] == "http")
            for port in service["spec"]["ports"]:
                assert target(port, container) == http, (service["metadata"]["name"], port, container["ports"])
