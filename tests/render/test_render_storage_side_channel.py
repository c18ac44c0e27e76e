"""The storage connector (TP 1 only) opens no KV side channel (the launcher leaves it out of its port plan):
`pdlaunch render kubernetes` neither checks side-channel ports for collisions with it nor declares any in the pods
or hands one to the instances, while nixl keeps its side-channel ports, at kv_transfer.side_channel_port."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import Result

import pdlaunch.render.kubernetes as render_kubernetes_module
from tests.config.cli_helpers import invoke

STORAGE_ERROR = "error: kv_transfer.connector: 'storage' passes KV through files"


def render(tmp_path: Path, raw: dict[str, object]) -> Result:
    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump(raw))
    return invoke(["render", "kubernetes", str(config), "--model", "tiny", "--device", "cpu",
                   "--out", str(tmp_path / "out"), "--image", "pdlaunch:test"])


def engine_pods(tmp_path: Path) -> list[dict[str, Any]]:
    """The leader pods' containers of every LeaderWorkerSet written to out/."""
    found = []
    for path in sorted((tmp_path / "out").glob("*.yaml")):
        manifest = yaml.safe_load(path.read_text())
        if manifest["kind"] == "LeaderWorkerSet":
            found += manifest["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"]
    return found


def instance_arg(container: dict[str, Any]) -> dict[str, Any]:
    args = container["args"]
    parsed: dict[str, Any] = json.loads(args[args.index("--instance") + 1])
    return parsed


@pytest.mark.parametrize("instances", [
    [{"role": "prefill", "base_port": 5600}, {"role": "decode"}],  # on the default side-channel port
    [{"role": "prefill", "base_port": 9000}, {"role": "decode"}],  # on the configured one
])
def test_storage_reports_no_side_channel_collision(tmp_path: Path, instances: list[dict[str, object]]) -> None:
    result = render(tmp_path, {"kv_transfer": {"connector": "storage", "side_channel_port": 9000},
                               "instances": instances})
    assert result.exit_code == 1 and STORAGE_ERROR in result.output, result.output
    # Only the refusal of storage itself: the side channel it never opens collides with nothing.
    assert "side channel" not in result.output.replace("no side channel", ""), result.output
    assert "error: instances[0].base_port" not in result.output, result.output
    assert "error: kv_transfer.side_channel_port" not in result.output, result.output


def test_nixl_still_reports_a_base_port_on_the_side_channel(tmp_path: Path) -> None:
    result = render(tmp_path, {"kv_transfer": {"connector": "nixl", "side_channel_port": 9000},
                               "instances": [{"role": "prefill", "base_port": 9000}, {"role": "decode"}]})
    assert result.exit_code == 1, result.output
    assert "error: kv_transfer.side_channel_port: port 9000 (instances[0] KV side channel) collides with " \
           "instances[0].base_port" in result.output, result.output


def test_nixl_pods_declare_and_pass_the_configured_side_channel(tmp_path: Path) -> None:
    result = render(tmp_path, {"kv_transfer": {"connector": "nixl", "side_channel_port": 9000},
                               "instances": [{"role": "prefill", "tp": 2}, {"role": "decode"}]})
    assert result.exit_code == 0, result.output
    prefill, decode = engine_pods(tmp_path)
    assert {p["name"]: p["containerPort"] for p in prefill["ports"] if p["name"].startswith("kv-side")} == \
        {"kv-side-0": 9000, "kv-side-1": 9001}
    assert instance_arg(prefill)["side_channel_port"] == 9000
    assert [p["containerPort"] for p in decode["ports"] if p["name"].startswith("kv-side")] == [9002]
    assert instance_arg(decode)["side_channel_port"] == 9002


def test_storage_pods_declare_and_pass_no_side_channel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # render refuses PD over storage (no shared volume for its files: test_render_storage_connector.py); with that
    # refusal lifted, the pods it would write must still open no side channel, as the launcher's instances do.
    monkeypatch.setattr(render_kubernetes_module, "storage_connector_problems", lambda cfg: [])
    result = render(tmp_path, {"kv_transfer": {"connector": "storage", "side_channel_port": 9000},
                               "instances": [{"role": "prefill"}, {"role": "decode"}]})
    assert result.exit_code == 0, result.output
    containers = engine_pods(tmp_path)
    assert len(containers) == 2
    for container in containers:
        assert not [p for p in container["ports"] if p["name"].startswith("kv-side")], container["ports"]
        assert instance_arg(container)["side_channel_port"] is None
        assert not any("5600" in str(v) or "9000" in str(v) for v in container.get("env", []))
