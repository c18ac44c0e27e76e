"""`pdlaunch render kubernetes --model-volume`: every pod that reads the checkpoint (each role's, each TP rank's, the
proxy's when it tokenizes) mounts the volume read-only where model.path is, the manifests stay valid, and a value the
pods could not use is refused naming its flag or field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import Result

from tests.config.cli_helpers import invoke
from tests.render.test_kubernetes import check_schemas

DNS_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def render(out: Path, *args: str) -> Result:
    return invoke(["render", "kubernetes", *args, "--out", str(out), "--image", "pdlaunch:test"])


def manifests(out: Path, *args: str) -> list[dict[str, Any]]:
    result = render(out, *args)
    assert result.exit_code == 0, result.output
    return [yaml.safe_load(path.read_text()) for path in sorted(out.glob("*.yaml"))]


def engine_pods(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    pods = []
    for lws in (m for m in found if m["kind"] == "LeaderWorkerSet"):
        template = lws["spec"]["leaderWorkerTemplate"]
        pods += [template["leaderTemplate"], template["workerTemplate"]]
    return pods


def proxy_pod(found: list[dict[str, Any]]) -> dict[str, Any]:
    return next(m for m in found if m["kind"] == "Deployment")["spec"]["template"]


def model_mounts(pod: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(volume, mount) of the pod's volumes that its container mounts, other than pdlaunch's own two."""
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    assert len(volumes) == len(pod["spec"].get("volumes", [])), "volume names must be unique"
    (container,) = pod["spec"]["containers"]
    return [(volumes[m["name"]], m) for m in container.get("volumeMounts", [])
            if m["mountPath"] not in ("/etc/pdlaunch", "/dev/shm")]


@pytest.mark.parametrize("args", [
    ["--device", "cpu"],
    ["--device", "cpu", "--colocated"],
    ["--device", "cuda", "--decode-tp", "4", "--gpus-per-node", "2", "--transfer-mode", "pull"],  # a pod per rank
])
def test_every_engine_pod_mounts_the_claim_read_only_at_the_models_directory(tmp_path: Path,
                                                                            args: list[str]) -> None:
    found = manifests(tmp_path / "out", "--model", "/models/llama-3-8b", "--model-volume", "pvc:llama.weights",
                      *args)
    for manifest in found:
        check_schemas(manifest)
    pods = engine_pods(found)
    assert pods
    for pod in pods:
        ((volume, mount),) = model_mounts(pod)
        assert volume["persistentVolumeClaim"] == {"claimName": "llama.weights", "readOnly": True}
        assert mount == {"name": volume["name"], "mountPath": "/models", "readOnly": True}
        assert DNS_1123_LABEL.fullmatch(volume["name"])
    assert model_mounts(proxy_pod(found)) == []  # round robin: the proxy reads no tokenizer


def test_a_gguf_file_mounts_its_directory_and_a_mount_path_holds_the_checkpoint(tmp_path: Path) -> None:
    found = manifests(tmp_path / "gguf", "--model", "/data/ckpt/m.gguf", "--device", "cpu",
                      "--model-volume", "hostpath:/srv/weights/")
    for pod in engine_pods(found):
        ((volume, mount),) = model_mounts(pod)
        assert volume["hostPath"] == {"path": "/srv/weights", "type": "Directory"}
        assert mount["mountPath"] == "/data/ckpt" and mount["readOnly"] is True
    found = manifests(tmp_path / "mounted", "--model", "/mnt/models/llama/", "--device", "cpu",
                      "--model-volume", "pvc:w", "--model-mount-path", "/mnt")
    assert {m["mountPath"] for pod in engine_pods(found) for _, m in model_mounts(pod)} == {"/mnt"}


def test_the_proxy_mounts_the_model_only_when_it_tokenizes(tmp_path: Path) -> None:
    found = manifests(tmp_path / "out", "--model", "/models/llama", "--device", "cpu", "--routing-policy", "prefix",
                      "--model-volume", "pvc:w")
    proxy = proxy_pod(found)
    check_schemas(next(m for m in found if m["kind"] == "Deployment"))
    args = proxy["spec"]["containers"][0]["args"]
    assert args[args.index("--tokenizer") + 1] == "/models/llama"
    ((volume, mount),) = model_mounts(proxy)
    assert volume["persistentVolumeClaim"]["claimName"] == "w" and mount["mountPath"] == "/models"


def test_without_a_model_volume_the_pods_mount_none(tmp_path: Path) -> None:
    found = manifests(tmp_path / "out", "--model", "tiny", "--device", "cpu", "--routing-policy", "prefix")
    assert all(model_mounts(pod) == [] for pod in [*engine_pods(found), proxy_pod(found)])


@pytest.mark.parametrize(("args", "flag", "says"), [
    (["--model-volume", "nfs:server"], "--model-volume", "names no volume"),
    (["--model-volume", "pvc"], "--model-volume", "names no volume"),
    (["--model-volume", "pvc:Llama_Weights"], "--model-volume", "not a PersistentVolumeClaim name"),
    (["--model-volume", "pvc:"], "--model-volume", "not a PersistentVolumeClaim name"),
    (["--model-volume", "hostpath:data/models"], "--model-volume", "absolute path"),
    (["--model-volume", "hostpath:/data/../etc"], "--model-volume", "absolute path"),
    (["--model-volume", "hostpath:/"], "--model-volume", "absolute path"),
    (["--model-mount-path", "/models"], "--model-mount-path", "without --model-volume"),
    (["--model-volume", "pvc:w", "--model-mount-path", "models"], "--model-mount-path", "absolute path"),
    (["--model-volume", "pvc:w", "--model-mount-path", "/"], "--model-mount-path", "absolute path"),
    (["--model-volume", "pvc:w", "--model-mount-path", "/data"], "--model", "not under --model-mount-path /data"),
    (["--model-volume", "pvc:w", "--model-mount-path", "/models/llama-3-8b-instruct"], "--model", "not under"),
    (["--model", "/etc/models/llama", "--model-volume", "pvc:w", "--model-mount-path", "/etc"],
     "--model-mount-path", "overlaps the pods' /etc/pdlaunch"),
])
def test_a_model_volume_the_pods_could_not_use_is_refused(tmp_path: Path, args: list[str], flag: str,
                                                          says: str) -> None:
    model = [] if "--model" in args else ["--model", "/models/llama-3-8b"]
    result = render(tmp_path / "out", *model, "--device", "cpu", *args)
    assert result.exit_code == 1, result.output
    assert f"error: {flag}:" in result.output and says in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("model", "says"), [
    ("tiny", "built into pdlaunch"), ("models/llama", "relative"), ("~/llama", "relative"),
    ("/llama", "directly under /"), ("/etc/pdlaunch/llama", "overlaps the pods' /etc/pdlaunch"),
    ("/dev/shm/llama", "overlaps the pods' /dev/shm"),
])
def test_a_model_path_the_volume_cannot_hold_is_refused(tmp_path: Path, model: str, says: str) -> None:
    config = tmp_path / "pd.yaml"
    config.write_text(yaml.safe_dump({"device": "cpu", "model": {"path": model}}))
    result = render(tmp_path / "out", str(config), "--model-volume", "pvc:w")
    assert result.exit_code == 1, result.output
    assert "error: model.path:" in result.output and says in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
