"""A multi-node deployment without a shared secret is refused by check-config as serve would refuse
it; secrets in a YAML file every local user can read are a warning."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest

from pdlaunch.config.rules.security import SECRET_ENV
from tests.config.cli_helpers import FREE_PORT, assert_invalid, check, invoke, write_yaml

CPU = ["--model", "tiny", "--device", "cpu", *FREE_PORT]
TWO_NODES = ("parallel: {nodes: [{address: 127.0.0.1}, {address: 127.0.0.2}]}\n"
             "instances:\n  - {role: prefill, node: 0}\n  - {role: decode, node: 0}\n")


@pytest.fixture(autouse=True)
def _no_inherited_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)


def test_multi_node_needs_a_deployment_secret(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, TWO_NODES)
    result = check([str(path), *CPU])
    assert_invalid(result, "security.deployment_secret", "multi-node")
    assert SECRET_ENV in result.output and "token_hex" in result.output
    served = invoke(["serve", str(path), *CPU, "--log-dir", str(tmp_path / "logs")])
    assert served.exit_code == 1 and "error: security.deployment_secret:" in served.output


def test_secret_from_the_file_or_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    in_file = write_yaml(tmp_path, TWO_NODES + "security: {deployment_secret: 0123456789abcdef0123}\n", "f.yaml")
    (tmp_path / "f.yaml").chmod(0o600)
    assert check([str(in_file), *CPU]).exit_code == 0
    monkeypatch.setenv(SECRET_ENV, "0123456789abcdef0123")
    assert check([str(write_yaml(tmp_path, TWO_NODES)), *CPU]).exit_code == 0


def test_short_secret_in_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, "short")
    assert_invalid(check([str(write_yaml(tmp_path, TWO_NODES)), *CPU]), SECRET_ENV, "fewer than 16")


def test_one_node_needs_no_secret() -> None:
    assert check(CPU).exit_code == 0


def test_api_key_in_a_world_readable_file_is_a_warning(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "security: {api_key: sk-local-test}\n")
    path.chmod(0o644)
    result = check([str(path), *CPU])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning: security.api_key:")]
    assert warnings and "PDLAUNCH_API_KEY" in warnings[0]
    report = json.loads(check([str(path), *CPU, "--json"]).stdout)
    assert report["valid"] and [w["field"] for w in report["warnings"]] == ["security.api_key"]


def test_the_chmod_a_world_readable_secret_file_is_told_to_run_is_one_a_shell_runs(tmp_path: Path) -> None:
    """The file's path went into the command as it is: `chmod o-r /x/my deploy.yaml` names two files."""
    path = write_yaml(tmp_path, "security: {api_key: sk-local-test}\n", name="my $USER deploy.yaml")
    path.chmod(0o644)
    line = next(line for line in check([str(path), *CPU]).output.splitlines()
                if line.startswith("warning: security.api_key:"))
    command = line.split("`", 1)[1].split("`", 1)[0]
    ran = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=False)
    assert ran.returncode == 0 and stat.S_IMODE(path.stat().st_mode) == 0o640, (command, ran.stderr)


def test_api_key_in_a_private_file_or_flag_is_no_warning(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "security: {api_key: sk-local-test}\n")
    path.chmod(0o600)
    assert "warning:" not in check([str(path), *CPU]).output
    assert "warning:" not in check([*CPU, "--api-key", "sk-local-test"]).output
