"""A dead instance's status row shows no KV blocks: the line of a SIGKILLed decode read `restarting (1) blocks
12/1456`, the dead process's last count, as if its blocks were still held somewhere."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.launcher.supervisor import Supervisor
from tests.serving.test_fault_tolerance_supervisor import FakeDeployment


def test_a_killed_instance_row_drops_its_block_count_until_it_is_ready_again(tmp_path: Path) -> None:
    cfg = DeploymentConfig.model_validate({"device": "cpu", "proxy": {"port": 0}})
    deployment = FakeDeployment(cfg, tmp_path)
    console = Console(record=True, width=300, file=open("/dev/null", "w"))  # noqa: SIM115
    supervisor = Supervisor(deployment, console)
    try:
        row = deployment.rows["decode-0"]
        row.blocks_used, row.blocks_total = 12, 1456
        decode = next(c for c in deployment.instances if c.name == "decode-0")
        decode.code = -9  # type: ignore[attr-defined]
        supervisor.tick(now=100.0)
        assert row.state == "restarting (1)" and row.blocks == "-"
        assert "decode-0     decode    cpu" in console.export_text() and "blocks 12/1456" not in console.export_text()
    finally:
        supervisor.__exit__()
        console.file.close()
