"""`--backend slurm` where the SLURM client cannot reach its controller (check-config and serve through the CLI, with a
stand-in `scontrol` that answers as SLURM 23's does on a machine with the client but no slurm.conf nor slurmctld).

- scontrol's four lines of stderr went into the message whole: check-config printed three of them as lines of
  their own (no `error:`, no field), serve prefixed each with `error:` as if they were four problems, and the
  hint was glued to the last. The message now holds the line that says why scontrol stopped (its `fatal:` line).
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tests.config.cli_helpers import FREE_PORT, check, invoke

# What `scontrol show hostnames node1` writes to stderr (exit 1) without a slurm.conf or a reachable slurmctld.
NO_CONTROLLER = """scontrol: error: resolve_ctls_from_dns_srv: res_nsearch error: Unknown host
scontrol: error: fetch_config: DNS SRV lookup failed
scontrol: error: _establish_config_source: failed to fetch config
scontrol: fatal: Could not establish a configuration source
"""


@pytest.fixture
def no_controller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SLURM allocation's environment, and SLURM's client tools on PATH whose scontrol reaches no controller."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "stderr").write_text(NO_CONTROLLER)
    for tool, body in (("scontrol", f"cat {tmp_path / 'stderr'} >&2\nexit 1"), ("srun", "exit 3")):  # srun never runs
        script = bin_dir / tool
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node1")


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_an_unreachable_controller_is_one_problem_with_scontrols_reason(no_controller: None, command: str) -> None:
    args = ["--model", "tiny", "--device", "cpu", "--backend", "slurm", *FREE_PORT]
    result = check(args) if command == "check-config" else invoke(["serve", *args])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    problems = [line for line in lines if line.startswith("error:")]
    hint = "check that slurmctld is reachable (`scontrol ping`)"
    assert problems == ["error: --backend: `scontrol show hostnames node1` failed: Could not establish a configuration "
                        "source" + (f" ({hint})" if command == "serve" else f"; {hint}")], result.output
    assert not any("res_nsearch" in line for line in lines), result.output
