"""The storage connector moves KV through files in kv_transfer.storage_path, which each pod has on its own
filesystem: a PD deployment rendered with it would have every decode pod compute every prompt again."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.config.cli_helpers import invoke


def render(tmp_path: Path, raw: dict[str, object]) -> tuple[int, str]:
    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = invoke(["render", "kubernetes", str(config), "--model", "tiny", "--device", "cpu",
                     "--out", str(tmp_path / "out"), "--image", "pdlaunch:test"])
    return result.exit_code, result.output


def test_pd_over_the_storage_connector_is_refused_naming_the_connector(tmp_path: Path) -> None:
    code, output = render(tmp_path, {"kv_transfer": {"connector": "storage"}})
    assert code == 1 and "error: kv_transfer.connector:" in output, output
    assert "own filesystem" in output and "nixl" in output
    assert not (tmp_path / "out").exists()


def test_colocated_instances_never_use_the_connector_and_render(tmp_path: Path) -> None:
    code, output = render(tmp_path, {"colocated": True, "kv_transfer": {"connector": "storage"}})
    assert code == 0, output
