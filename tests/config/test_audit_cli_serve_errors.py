"""What serve says when it fails after the config checked out: the error names the flag the user typed (`--port`),
not the config path the launcher knows it by (`proxy.port`), and the README's troubleshooting row is that message."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.config.cli_helpers import invoke, write_yaml

CPU = ["--model", "tiny", "--device", "cpu"]
README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process holds: a listening socket."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def _troubleshooting_row(start: str) -> str:
    """The message column of the troubleshooting row whose message begins with `start`."""
    rows = [line for line in README.splitlines() if line.startswith(f"| `{start}")]
    assert len(rows) == 1, f"README has {len(rows)} troubleshooting rows starting {start!r}"
    return rows[0].split("`")[1]


def test_port_in_use_names_the_flag_typed(taken_port: int, tmp_path: Path) -> None:
    served = invoke(["serve", *CPU, "--port", str(taken_port), "--log-dir", str(tmp_path / "logs")])
    assert served.exit_code == 1, served.output
    assert f"error: --port: port {taken_port} (proxy) on 127.0.0.1 is already in use" in served.output, served.output
    assert not (tmp_path / "logs").exists()


def test_port_in_use_from_the_yaml_names_the_key(taken_port: int, tmp_path: Path) -> None:
    path = write_yaml(tmp_path, f"proxy:\n  port: {taken_port}\nlog_dir: {tmp_path / 'logs'}\n")
    served = invoke(["serve", str(path), *CPU])
    assert served.exit_code == 1 and "error: proxy.port: " in served.output, served.output


def test_readme_row_for_a_port_in_use_is_the_message(taken_port: int, tmp_path: Path) -> None:
    served = invoke(["serve", *CPU, "--port", str(taken_port), "--log-dir", str(tmp_path / "logs")])
    documented = _troubleshooting_row("--port: port N (proxy)")
    pattern = re.escape(documented).replace("N", r"\d+").replace("HOST", r"\S+")
    assert re.search(pattern, served.output), f"README says {documented!r}; serve said {served.output!r}"


def test_backend_outside_slurm_names_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    served = invoke(["serve", *CPU, "--backend", "slurm"])
    assert served.exit_code == 1 and "error: --backend: " in served.output, served.output
