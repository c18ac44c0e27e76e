"""The deployment's Secret and the pods that read it: its values appear in no other manifest, and a render whose
Secret differs (a fresh deployment secret, another API key) changes the pod template of every pod that read the
old one, so `kubectl apply` replaces them all instead of leaving a proxy and instances with different secrets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.config.cli_helpers import invoke

API_KEY = "sk-render-test-key-0123"
ENGINE_ID = "e" * 32  # fixed: a render of the same config changes no pod template


def render(out: Path, tmp_path: Path, *args: str) -> dict[str, dict[str, Any]]:
    config = tmp_path / "deploy.yaml"
    # pull: prefill TP 1 feeds decode TP 4 (render/reshard.py)
    config.write_text(yaml.safe_dump({"kv_transfer": {"engine_id": ENGINE_ID, "transfer_mode": "pull"}}))
    result = invoke(["render", "kubernetes", str(config), "--model", "tiny", "--device", "cuda", "--decode-tp", "4",
                     "--gpus-per-node", "2", *args, "--out", str(out), "--image", "pdlaunch:test"])
    assert result.exit_code == 0, result.output
    return {path.name: yaml.safe_load(path.read_text()) for path in sorted(out.glob("*.yaml"))}


def pod_templates(manifests: dict[str, dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for file, manifest in manifests.items():
        if manifest["kind"] == "Deployment":
            yield file, manifest["spec"]["template"]
        elif manifest["kind"] == "LeaderWorkerSet":
            template = manifest["spec"]["leaderWorkerTemplate"]
            yield f"{file} leader", template["leaderTemplate"]
            yield f"{file} worker", template["workerTemplate"]


def test_secret_values_stay_in_the_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDLAUNCH_DEPLOYMENT_SECRET", "d" * 40)
    render(tmp_path / "out", tmp_path, "--api-key", API_KEY)
    for path in (tmp_path / "out").glob("*.yaml"):
        text = path.read_text()
        inlined = API_KEY in text or "d" * 40 in text
        assert inlined == path.name.startswith("00-secret-"), path.name


def test_a_changed_secret_replaces_every_pod_that_read_the_old_one(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDLAUNCH_DEPLOYMENT_SECRET", "a" * 32)
    first = render(tmp_path / "first", tmp_path, "--api-key", API_KEY)
    assert render(tmp_path / "again", tmp_path, "--api-key", API_KEY) == first  # nothing changed, nothing restarts
    monkeypatch.setenv("PDLAUNCH_DEPLOYMENT_SECRET", "b" * 32)
    rotated = dict(pod_templates(render(tmp_path / "rotated", tmp_path, "--api-key", API_KEY)))
    monkeypatch.setenv("PDLAUNCH_DEPLOYMENT_SECRET", "a" * 32)
    new_key = dict(pod_templates(render(tmp_path / "new-key", tmp_path, "--api-key", API_KEY + "x")))
    templates = dict(pod_templates(first))
    assert len(templates) == 5  # the proxy, and the leader and worker templates of both groups
    for name, template in templates.items():
        assert rotated[name] != template, f"{name} keeps its pods after the deployment secret changed"
        assert new_key[name] != template, f"{name} keeps its pods after the API key changed"
