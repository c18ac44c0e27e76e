"""check-config probes the fixed ports planned on the other nodes (config/rules/node_ports.py): a TCP connect
to each, all at once. Something listening at one is a warning naming the field, the node and host:port (as a
port in use on this machine is); a node that does not answer within the timeout is a warning that its ports were
not checked. `serve --backend slurm` runs the probe before its srun steps and stops at a port in use.

127.0.0.2 plays node 1 (any 127/8 address is this machine's loopback on Linux). A listener whose accept queue
is full drops new connections' SYNs, as a firewall or a host that is down does: the probe's timeout, without
root or an unroutable network.
"""

from __future__ import annotations

import json
import socket
import stat
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from pdlaunch.cli import app
from pdlaunch.config import addresses
from pdlaunch.config.addresses import PROBE_TIMEOUT_S, probe_ports
from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.rules import node_ports
from tests.helpers.ports import free_port

NODE1 = "127.0.0.2"
CPU = ["--model", "tiny", "--device", "cpu"]
SECRET = "stand-in-secret-for-the-node-ports-test"


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDLAUNCH_DEPLOYMENT_SECRET", SECRET)  # a multi-node deployment needs one


def invoke(args: list[str]) -> Result:
    result = CliRunner().invoke(app, args, env={"COLUMNS": "1000"}, terminal_width=1000)
    assert "Traceback" not in result.output, result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"pdlaunch {' '.join(args)} raised {result.exception!r}\n{result.output}")
    return result


def warnings_of(output: str, field: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(f"warning: {field}:")]


@contextmanager
def listening(host: str) -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind((host, 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@contextmanager
def not_answering(host: str) -> Iterator[int]:
    """A port whose SYNs are dropped: a listener with a backlog of 0 and one connection it never accepts."""
    with socket.socket() as sock, socket.socket() as filler:
        sock.bind((host, 0))
        sock.listen(0)
        port = int(sock.getsockname()[1])
        filler.connect((host, port))
        yield port


def two_nodes(tmp_path: Path, decode_port: int, node1: str = NODE1, prefill_port: int | None = None) -> Path:
    """Prefill on node 0 (127.0.0.1), two decode instances on node 1 at decode_port, decode_port + 1."""
    prefill = prefill_port if prefill_port is not None else free_port("127.0.0.1")
    path = tmp_path / "two-nodes.yaml"
    path.write_text(f"parallel: {{nodes: [{{address: 127.0.0.1}}, {{address: '{node1}'}}]}}\n"
                    "kv_transfer: {side_channel_host: 0.0.0.0}\n"
                    f"proxy: {{port: {free_port('127.0.0.1')}}}\n"
                    f"log_dir: {tmp_path / 'logs'}\n"
                    "instances:\n"
                    f"  - {{role: prefill, count: 1, node: 0, base_port: {prefill}}}\n"
                    f"  - {{role: decode, count: 2, node: 1, base_port: {decode_port}}}\n")
    return path


def check_json(args: list[str]) -> dict[str, Any]:
    result = invoke(["check-config", *args, "--json"])
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["valid"] == (result.exit_code == 0)
    return report


def test_a_port_something_listens_at_on_another_node_is_a_warning_naming_field_node_and_address(
        tmp_path: Path) -> None:
    with listening(NODE1) as port:
        path = two_nodes(tmp_path, port)
        result = invoke(["check-config", str(path), *CPU])
        assert result.exit_code == 0, result.output
        assert warnings_of(result.output, "instances[1].base_port") == [
            f"warning: instances[1].base_port: ports {port}-{port + 1} (decode HTTP) on node 1: something listens "
            f"at {NODE1}:{port} now, so node 1's launcher would stop there; stop what listens there or choose "
            "another port; `ss -ltnp` on node 1 names it"], result.output
        report = check_json([str(path), *CPU])
    assert report["valid"] and not report["problems"]
    found = [w for w in report["warnings"] if w["field"] == "instances[1].base_port"]
    assert len(found) == 1 and f"{NODE1}:{port} now" in found[0]["message"], report["warnings"]


def test_free_ports_on_another_node_pass_quietly(tmp_path: Path) -> None:
    report = check_json([str(two_nodes(tmp_path, free_port(NODE1))), *CPU])
    assert report["valid"] and report["warnings"] == [], report["warnings"]


def test_node_0s_proxy_port_checked_from_node_1_names_the_flag(tmp_path: Path) -> None:
    with listening("127.0.0.1") as port:
        result = invoke(["check-config", str(two_nodes(tmp_path, free_port(NODE1))), *CPU,
                         "--node-rank", "1", "--port", str(port)])
    assert result.exit_code == 0, result.output
    lines = [line for line in warnings_of(result.output, "--port") if "listens" in line]  # not the flag-over-file one
    assert len(lines) == 1 and f"port {port} (proxy) on node 0: something listens at 127.0.0.1:{port}" in lines[0]


def test_a_node_that_does_not_answer_is_a_warning_within_the_timeout(tmp_path: Path) -> None:
    with not_answering(NODE1) as port:
        path = two_nodes(tmp_path, port)
        started = time.monotonic()
        result = invoke(["check-config", str(path), *CPU])
        took = time.monotonic() - started
        report = check_json([str(path), *CPU])
    assert result.exit_code == 0 and "valid" in result.output, result.output
    assert warnings_of(result.output, "parallel.nodes[1].address") == [
        f"warning: parallel.nodes[1].address: node 1 ({NODE1}) could not be reached to check its ports (no answer "
        f"within {PROBE_TIMEOUT_S:g}s), so these are not checked: ports {port}-{port + 1} (decode HTTP); check that "
        f"this machine reaches {NODE1}, or ignore this when checking away from the cluster"], result.output
    assert "listens" not in result.output
    assert took < PROBE_TIMEOUT_S + 10.0, f"check-config took {took:.1f}s"  # not the kernel's 2-minute connect
    assert report["valid"] and [w["field"] for w in report["warnings"]] == ["parallel.nodes[1].address"]


def test_a_node_name_that_does_not_resolve_is_a_warning(tmp_path: Path) -> None:
    result = invoke(["check-config", str(two_nodes(tmp_path, 8200, node1="nosuchhost.invalid")), *CPU])
    assert result.exit_code == 0, result.output
    lines = warnings_of(result.output, "parallel.nodes[1].address")
    assert len(lines) == 1 and "nosuchhost.invalid does not resolve here" in lines[0], result.output


def test_many_ports_are_probed_at_once() -> None:
    """Twenty ports that do not answer take one timeout, not twenty; each answer is kept apart."""
    with ExitStack() as stack, listening(NODE1) as busy:
        silent = [stack.enter_context(not_answering(NODE1)) for _ in range(20)]
        free = free_port(NODE1)
        started = time.monotonic()
        answers = probe_ports([(NODE1, port) for port in [*silent, busy, free]], timeout_s=1.0)
        took = time.monotonic() - started
    assert took < 5.0, f"{took:.1f}s for 22 ports"
    assert {answers[(NODE1, port)].state for port in silent} == {"unreached"}
    assert answers[(NODE1, busy)].state == "listening" and answers[(NODE1, free)].state == "free"


def _probe_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object, **__: object) -> object:
        raise AssertionError("no port should be probed here")

    monkeypatch.setattr(node_ports, "probe_ports", refuse)
    monkeypatch.setattr(addresses, "probe_ports", refuse)


def test_a_single_node_config_probes_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _probe_nothing(monkeypatch)
    result = invoke(["check-config", *CPU, "--log-dir", str(tmp_path / "logs"), "--port", str(free_port("127.0.0.1"))])
    assert result.exit_code == 0, result.output


def test_a_target_host_probes_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _probe_nothing(monkeypatch)
    result = invoke(["check-config", str(two_nodes(tmp_path, 8200)), *CPU, "--target-gpus", "1",
                     "--target-gpu-memory", "80"])
    assert result.exit_code == 0, result.output


def test_this_nodes_ports_are_bind_tested_not_probed_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    probed: list[tuple[str, int]] = []

    def spy(targets: Any, timeout_s: float = PROBE_TIMEOUT_S) -> Any:
        wanted = list(targets)
        probed.extend(wanted)
        return probe_ports(wanted, timeout_s)

    monkeypatch.setattr(node_ports, "probe_ports", spy)
    with listening("127.0.0.1") as port:
        result = invoke(["check-config", str(two_nodes(tmp_path, free_port(NODE1), prefill_port=port)), *CPU])
    assert result.exit_code == 0, result.output
    lines = warnings_of(result.output, "instances[0].base_port")
    assert len(lines) == 1 and f"on 127.0.0.1: {port} in use now" in lines[0], result.output  # the bind test's
    assert probed and {host for host, _ in probed} == {NODE1}, probed


@pytest.mark.parametrize(("backend", "rank", "nodes", "probed"), [
    ("local", 0, 3, [1, 2]), ("local", 1, 3, [0, 2]), ("slurm", 0, 2, [0, 1]), ("local", 0, 0, [])])
def test_which_nodes_are_probed(backend: str, rank: int, nodes: int, probed: list[int]) -> None:
    cfg = DeploymentConfig.model_validate({
        "launcher": {"backend": backend},
        "parallel": {"nodes": [{"address": f"10.0.0.{k + 1}"} for k in range(nodes)], "node_rank": rank}})
    assert node_ports.probed_nodes(cfg) == probed
    ray = cfg.model_copy(update={"launcher": cfg.launcher.model_copy(update={"backend": "ray"})})
    assert node_ports.probed_nodes(ray) == []  # Ray places every rank itself: no node address is known


@pytest.fixture
def allocation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A SLURM allocation of gpu07 (127.0.0.1) and gpu08 (127.0.0.2): stand-in `scontrol`, and an `srun` that
    leaves a file when it runs (the returned path)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    started = tmp_path / "srun-started"
    scripts = {
        "scontrol": """#!/bin/sh
case "$1 $2" in
  "show hostnames") printf 'gpu07\\ngpu08\\n' ;;
  "show node") case "$4" in gpu07) a=127.0.0.1 ;; *) a=127.0.0.2 ;; esac; echo "NodeName=$4 NodeAddr=$a" ;;
  *) exit 2 ;;
esac
""",
        "srun": f"#!/bin/sh\ntouch {started}\nexit 1\n",
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    return started


def test_serve_under_slurm_stops_at_a_port_in_use_before_any_step(tmp_path: Path, allocation: Path) -> None:
    with listening(NODE1) as port:
        path = two_nodes(tmp_path, port)
        result = invoke(["serve", str(path), *CPU, "--backend", "slurm"])
        checked = invoke(["check-config", str(path), *CPU, "--backend", "slurm"])
    assert result.exit_code == 1, result.output
    assert (f"error: instances[1].base_port: ports {port}-{port + 1} (decode HTTP) on node 1: something listens at "
            f"{NODE1}:{port} now, so node 1's launcher would stop there") in result.output, result.output
    assert not allocation.exists(), "an srun step started"
    assert checked.exit_code == 0 and warnings_of(checked.output, "instances[1].base_port"), checked.output
