"""With `--kv-connector storage` nothing opens a KV side channel (KV moves through files), so
kv_transfer.side_channel_port claims no ports: check-config refused a config whose side-channel range met another
port ("collides with parallel.master_port"), and serve stopped on a side-channel port in use, for ports no process
binds. Now the field is left out of the port plan with storage, and check-config warns that it has no effect."""

from __future__ import annotations

import socket
from pathlib import Path

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.rules.resources import port_plan
from pdlaunch.launcher.plan import plan_deployment
from tests.config.cli_helpers import FREE_PORT, assert_invalid, check

COLLIDING = "kv_transfer: {connector: CONNECTOR, side_channel_port: 29499}\nparallel: {master_port: 29500}\n"


def _check(tmp_path: Path, connector: str) -> list[str]:
    path = tmp_path / "kv.yaml"
    path.write_text(COLLIDING.replace("CONNECTOR", connector))
    result = check([str(path), "--model", "tiny", "--device", "cpu", *FREE_PORT])
    if connector != "storage":
        assert_invalid(result, "kv_transfer.side_channel_port", "collide with parallel.master_port")
        return []
    assert result.exit_code == 0, result.output
    assert "side channel none (storage)" in result.output, result.output
    return [" ".join(line.split()) for line in result.output.splitlines() if line.startswith("warning:")]


def test_a_side_channel_range_meeting_another_port_is_refused_only_where_a_side_channel_opens(tmp_path: Path) -> None:
    _check(tmp_path, "nixl")  # the collision is real there: the prefill binds 29499, 29500 is the rendezvous port
    warned = _check(tmp_path, "storage")
    assert [w for w in warned if "side_channel_port" in w] == [
        "warning: kv_transfer.side_channel_port: has no effect with the storage connector: only nixl and mooncake "
        "read it; drop it, or choose that connector (--kv-connector)"], warned


def test_serve_claims_no_side_channel_port_with_storage() -> None:
    with socket.socket() as held:  # something else listens on the configured side-channel port
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        cfg = DeploymentConfig.model_validate({"device": "cpu", "model": {"path": "tiny"}, "proxy": {"port": 0},
                                               "kv_transfer": {"connector": "storage", "side_channel_port": port}})
        plan = plan_deployment(cfg)  # raised "port N (prefill-0 side channel rank 0) ... is already in use"
        assert [r for r in port_plan(cfg) if r.field == "kv_transfer.side_channel_port"] == []
    assert [i.spec.side_channel_port for i in plan.instances] == [None, None]
