"""What `--backend ray` says when Ray did not place an instance's placement group within
launcher.ray_placement_timeout_seconds (launcher/backends/ray_actors.py), with a stand-in `ray` module: every
instance fits the cluster (check-config refuses one that never could), so what is short is free room, and the
message shows what the group asks for against what is free now and in all, in the resources it asks for."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.ray_cluster import InstancePlacement
from pdlaunch.launcher.backends.ray_actors import RayActors
from pdlaunch.launcher.backends.ray_run import RayDeploymentFailed

NODES = [{"NodeID": f"n{i}", "NodeManagerAddress": address, "Alive": True,
          "Resources": {"CPU": 2.0, "memory": 22188289024.0, "object_store_memory": 80000000.0,
                        f"node:{address}": 1.0}} for i, address in enumerate(("10.0.0.1", "10.0.0.2", "10.0.0.3"))]


class StandInRay:
    """The calls RayActors.placed makes: the group is never ready; six CPUs in all, two of them free."""

    def wait(self, refs: list[Any], timeout: float) -> tuple[list[Any], list[Any]]:
        return [], refs

    def nodes(self) -> list[dict[str, Any]]:
        return NODES

    def available_resources(self) -> dict[str, float]:
        return {"CPU": 2.0, "memory": 66510652416.0, "object_store_memory": 240000000.0}


def test_an_unplaced_group_is_shown_against_the_clusters_free_and_total_resources(tmp_path: Path) -> None:
    cfg = DeploymentConfig.model_validate({"device": "cpu", "launcher": {"backend": "ray",
                                                                        "ray_placement_timeout_seconds": 20}})
    actors = RayActors(StandInRay(), cfg, tmp_path, lambda line: None)  # type: ignore[arg-type]
    run = SimpleNamespace(name="decode-0", pg_ready=object(), placed_by=0.0,
                          placement=InstancePlacement([{"CPU": 1.0}] * 4, "SPREAD", "decode"))
    with pytest.raises(RayDeploymentFailed) as failed:
        actors.placed(run)  # type: ignore[arg-type]
    text = failed.value.render()
    assert failed.value.field == "launcher.ray_placement_timeout_seconds", text
    assert ("Ray could not place decode-0's placement group within 20s: it asks for 4 bundle(s) of {CPU: 1} "
            "(SPREAD), and the cluster has {CPU: 2} free now, of {CPU: 6} in all") in text, text
    assert "10.0.0.1 {CPU: 2}; 10.0.0.2 {CPU: 2}; 10.0.0.3 {CPU: 2}" in text, text
    assert "memory" not in text and "22188289024" not in text, text  # only the resources the group asks for
    assert "lower the TP size or the instance count" in text and "ray status" in text, text
