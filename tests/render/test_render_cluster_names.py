"""What Kubernetes and the LWS controller make of the rendered names, and what the pods of a TP group spread over
several pods share: the StatefulSets the LWS controller creates (one of leaders per LeaderWorkerSet, one of
workers per leader pod, named after it) stay within the length whose pods Kubernetes can label, whatever the
model path; the ranks of a spread group prove themselves to rank 0 with the deployment's Secret."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.config.cli_helpers import invoke

STATEFULSET_NAME_MAX = 52  # its pods get the label `<name>-<10-character revision hash>`, at most 63 characters
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


def render(out: Path, *args: str) -> tuple[int, str]:
    model = [] if "--model" in args else ["--model", "tiny"]
    result = invoke(["render", "kubernetes", *model, *args, "--out", str(out), "--image", "pdlaunch:test"])
    return result.exit_code, result.output


def manifests(out: Path) -> list[dict[str, Any]]:
    return [yaml.safe_load(path.read_text()) for path in sorted(out.glob("*.yaml"))]


def statefulsets(lws: dict[str, Any]) -> list[str]:
    """The StatefulSets the LWS controller creates for a LeaderWorkerSet: the leaders' (its own name), and per
    group of more than one pod the workers' (the leader pod's name, `<lws>-<group>`)."""
    name, spec = lws["metadata"]["name"], lws["spec"]
    size = spec["leaderWorkerTemplate"].get("size", 1)
    return [name] + ([f"{name}-{k}" for k in range(spec["replicas"])] if size > 1 else [])


def engine(pod: dict[str, Any]) -> dict[str, Any]:
    (only,) = pod["spec"]["containers"]
    return only


def spread_ok_name(out: Path, *args: str) -> list[str]:
    code, output = render(out, *args)
    assert code == 0, output
    names = []
    for manifest in manifests(out):
        assert DNS_1035_LABEL.fullmatch(manifest["metadata"]["name"]), manifest["metadata"]["name"]
        if manifest["kind"] == "LeaderWorkerSet":
            names += statefulsets(manifest)
    assert names and all(len(n) <= STATEFULSET_NAME_MAX for n in names), names
    return names


@pytest.mark.parametrize(("args", "longest"), [
    (["--colocated", "--tp", "4"], 38),  # `NAME-colocated-0-0`: the worker StatefulSet of group 0
    (["--prefill", "11", "--tp", "4"], 39),  # `NAME-prefill-0-10` (decode of the same TP: no resharding)
])
def test_a_name_whose_worker_statefulsets_kubernetes_cannot_run_is_refused(tmp_path: Path, args: list[str],
                                                                            longest: int) -> None:
    spread = ["--device", "cuda", "--gpus-per-node", "2", *args]
    code, output = render(tmp_path / "out", "--name", "a" * 40, *spread)
    assert code == 1, output
    assert "error: --name:" in output and "StatefulSet" in output and f"at most {longest} characters" in output
    assert not (tmp_path / "out").exists()
    names = spread_ok_name(tmp_path / "ok", "--name", "a" * longest, *spread)
    assert max(map(len, names)) == STATEFULSET_NAME_MAX


def test_a_tenth_group_is_counted_in_the_names(tmp_path: Path) -> None:
    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump({"colocated": True, "instances": [{"role": "colocated", "count": 0}] * 10
                                      + [{"role": "colocated", "count": 1}]}))
    code, output = render(tmp_path / "out", str(config), "--device", "cpu", "--name", "b" * 40)
    assert code == 1 and "'" + "b" * 40 + "-colocated-10'" in output and "at most 39 characters" in output, output
    spread_ok_name(tmp_path / "ok", str(config), "--device", "cpu", "--name", "b" * 39)


@pytest.mark.parametrize("model", ["/models/Meta-Llama-3.1-8B_Instruct", "/models/" + "M" * 80])
def test_a_model_path_never_reaches_an_object_name(tmp_path: Path, model: str) -> None:
    names = spread_ok_name(tmp_path / "out", "--model", model, "--device", "cuda", "--decode-tp", "4",
                           "--gpus-per-node", "2", "--transfer-mode", "pull")
    assert "pdlaunch-decode-1-0" in names


def test_every_rank_of_a_spread_group_gets_the_link_secret_from_the_secret(tmp_path: Path) -> None:
    """Rank 0 accepts a rank in another pod on a key derived from the config, which anyone reading the model path
    and ports can derive, unless PDLAUNCH_TP_SECRET is mixed in: the pods take it from the Secret."""
    code, output = render(tmp_path / "out", "--device", "cuda", "--decode-tp", "4", "--gpus-per-node", "2",
                          "--transfer-mode", "pull")
    assert code == 0, output
    found = manifests(tmp_path / "out")
    decode = next(m for m in found if m["kind"] == "LeaderWorkerSet" and m["metadata"]["name"] == "pdlaunch-decode-1")
    template = decode["spec"]["leaderWorkerTemplate"]
    expected = {"name": "PDLAUNCH_TP_SECRET",
                "valueFrom": {"secretKeyRef": {"name": "pdlaunch-deployment", "key": "deployment-secret"}}}
    for pod in (template["leaderTemplate"], template["workerTemplate"]):
        assert expected in engine(pod)["env"]
    prefill = next(m for m in found if m["kind"] == "LeaderWorkerSet" and m["metadata"]["name"] == "pdlaunch-prefill-0")
    assert all(e["name"] != "PDLAUNCH_TP_SECRET"  # one pod: its ranks talk over pipes, no link to guard
               for e in engine(prefill["spec"]["leaderWorkerTemplate"]["leaderTemplate"])["env"])
