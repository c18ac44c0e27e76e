"""Instance names count per role across `instances` groups (config/instance_names.py): two decode groups of one
are decode-0 and decode-1, not two decode-0s sharing a log file, an engine_id and the proxy's name for them.
Ports and devices stay per group; a deployment with one group per role keeps the names it always had."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.port_plan import plan_instances
from pdlaunch.config.rules.host import _served_files
from pdlaunch.launcher.deployment import Deployment
from pdlaunch.launcher.plan import plan_deployment
from pdlaunch.proxy.__main__ import parse_args
from pdlaunch.proxy.instance_flags import parse_instances
from tests.config.cli_helpers import check
from tests.launcher.free_ports import free_on_both

SECRET = {"deployment_secret": "instance-names-secret-0123456789"}
TWO_DECODE_GROUPS = [{"role": "prefill"}, {"role": "decode"}, {"role": "decode"}]


def _cfg(instances: list[dict[str, Any]], **more: Any) -> DeploymentConfig:
    return DeploymentConfig.model_validate({"device": "cpu", "model": {"path": "tiny"}, "security": SECRET,
                                            "proxy": {"port": 0}, "instances": instances, **more})


@pytest.mark.parametrize(("instances", "names"), [
    (TWO_DECODE_GROUPS, ["prefill-0", "decode-0", "decode-1"]),
    ([{"role": "prefill", "count": 2}, {"role": "decode"}, {"role": "prefill"}, {"role": "decode", "count": 0},
      {"role": "decode", "count": 2}],
     ["prefill-0", "prefill-1", "decode-0", "prefill-2", "decode-1", "decode-2"]),
    ([{"role": "colocated"}, {"role": "colocated", "count": 2}], ["colocated-0", "colocated-1", "colocated-2"]),
    # one group per role: the names every deployment had before
    ([{"role": "prefill", "count": 2}, {"role": "decode", "count": 3}],
     ["prefill-0", "prefill-1", "decode-0", "decode-1", "decode-2"]),
    ([{"role": "colocated", "count": 2}], ["colocated-0", "colocated-1"]),
])
def test_names_count_per_role_across_groups(instances: list[dict[str, Any]], names: list[str]) -> None:
    colocated = {"colocated": True} if instances[0]["role"] == "colocated" else {}
    cfg = _cfg(instances, **colocated)
    assert [p.name for p in plan_instances(cfg, [])] == names
    assert [p.spec.name for p in plan_deployment(cfg).instances] == names


def test_ports_stay_per_group() -> None:
    """A group's HTTP ports are base_port + k, k its instance's place in the group, whatever its name's number."""
    b = free_on_both(5, "instance names test")  # the launcher claims the ports it plans
    cfg = _cfg([{"role": "prefill", "base_port": b}, {"role": "decode", "count": 2, "base_port": b + 1},
                {"role": "decode", "base_port": b + 3}])
    planned = plan_instances(cfg, [])
    assert [(p.name, p.group, p.http_port) for p in planned] == [
        ("prefill-0", 0, b), ("decode-0", 1, b + 1), ("decode-1", 1, b + 2), ("decode-2", 2, b + 3)]
    assert [(p.spec.name, p.spec.port) for p in plan_deployment(cfg).instances] == [
        ("prefill-0", b), ("decode-0", b + 1), ("decode-1", b + 2), ("decode-2", b + 3)]


def test_two_decode_groups_get_their_own_engine_ids_and_logs() -> None:
    cfg = _cfg(TWO_DECODE_GROUPS, kv_transfer={"engine_id": "dep"})
    specs = [p.spec for p in plan_deployment(cfg).instances]
    assert [s.engine_id for s in specs] == ["dep-prefill-0", "dep-decode-0", "dep-decode-1"]
    assert len({s.port for s in specs}) == 3
    logs = [f for f in _served_files(cfg) if f.endswith(".log")]
    assert logs == ["prefill-0.log", "decode-0.log", "decode-1.log", "proxy.log"]


def test_the_proxy_the_launcher_starts_gets_every_instance(tmp_path: Path) -> None:
    """The launcher's proxy flags name each instance once (two decode-0s made the proxy refuse its
    --engine-id flags, and would have keyed routing and metrics on one name)."""
    cfg = _cfg(TWO_DECODE_GROUPS, kv_transfer={"engine_id": "dep"}, log_dir=str(tmp_path))
    deployment = Deployment(cfg, log_dir=tmp_path)
    args = parse_args(deployment._proxy_argv()[3:])
    urls = {p.spec.name: p.url for p in deployment.plan.instances}
    assert args.decode == [f"decode-0={urls['decode-0']}", f"decode-1={urls['decode-1']}"]
    assert args.engine_ids == {"prefill-0": "dep-prefill-0", "decode-0": "dep-decode-0", "decode-1": "dep-decode-1"}


def test_every_node_names_the_instances_alike(tmp_path: Path) -> None:
    """A decode group per node: node 1's launcher runs decode-1, the name node 0's proxy expects of it."""
    b = free_on_both(2, "instance names test")

    def on(node: int) -> DeploymentConfig:
        return _cfg([{"role": "prefill", "base_port": b}, {"role": "decode", "base_port": b + 1},
                     {"role": "decode", "node": 1, "base_port": b + 1}], log_dir=str(tmp_path),
                    kv_transfer={"side_channel_host": "0.0.0.0"},
                    parallel={"nodes": [{"address": "127.0.0.1"}, {"address": "127.0.0.2"}], "node_rank": node})
    assert [p.spec.name for p in plan_deployment(on(1)).local] == ["decode-1"]
    node0 = on(0)
    args = parse_args(Deployment(node0, log_dir=tmp_path)._proxy_argv()[3:])
    assert args.decode == [f"decode-0=http://127.0.0.1:{b + 1}", f"decode-1=http://127.0.0.2:{b + 1}"]
    assert args.engine_ids == {"prefill-0": f"{node0.kv_transfer.engine_id}-prefill-0",
                               "decode-0": f"{node0.kv_transfer.engine_id}-decode-0", "decode-1": "*-decode-1"}


@pytest.mark.parametrize("decodes", [
    ["decode-0=http://127.0.0.1:9201", "decode-0=http://127.0.0.1:9202"],
    ["http://127.0.0.1:9201", "decode-0=http://127.0.0.1:9202"],  # a bare URL is named as the launcher would
    ["http://127.0.0.1:9201", "prefill-0=http://127.0.0.1:9202"],
])
def test_the_proxy_refuses_two_instances_of_one_name(decodes: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--prefill", "http://127.0.0.1:9100"] + [a for d in decodes for a in ("--decode", d)]
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 1  # pdlaunch.errors.ArgumentParser: usage errors exit 1
    assert "two instances are named" in capsys.readouterr().err


def test_the_proxy_names_bare_urls_as_the_launcher_does() -> None:
    args = parse_args(["--prefill", "http://127.0.0.1:9100", "--decode", "http://127.0.0.1:9201",
                       "--decode", "http://127.0.0.1:9202"])
    assert [i.name for i in parse_instances("decode", args.decode)] == ["decode-0", "decode-1"]


def test_check_config_names_each_groups_instances(tmp_path: Path) -> None:
    config = tmp_path / "two-decode-groups.yaml"
    config.write_text("model: {path: tiny}\ndevice: cpu\ninstances:\n  - {role: prefill, count: 1}\n"
                      "  - {role: decode, count: 1}\n  - {role: decode, count: 2}\n")
    result = check([str(config)])
    assert result.exit_code == 0, result.output
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in result.output.splitlines()
            if line.startswith("│")]
    assert [(row[0], row[3]) for row in rows[:3]] == [("0", "prefill-0"), ("1", "decode-0"), ("2", "decode-1..2")]
