"""What the `--backend slurm` batch process makes of its steps' own lines (launcher/backends/slurm_lines.py): the
device each node resolved `auto` to (the nodes must agree with node 0), and a step's error line, which becomes
the launcher's one error line (`error: node K: FIELD: MESSAGE`), exit 1, no traceback. A stand-in `srun` on
PATH prints what FAKE_DIR/say-K holds as node K's step, then exits with FAKE_DIR/exit-K's code or runs until
the launcher stops it; nothing answers at the proxy's port, so the launcher is still starting throughout. Like
srun, it labels each line with its task number (`0: `) when SLURM_LABELIO is in its environment, and its task
gets no deployment unless srun exports the whole environment (--export, SRUN_EXPORT_ENV, SLURM_EXPORT_ENV)."""

from __future__ import annotations

import io
import os
import socket
import stat
import types
from pathlib import Path

import pytest
from rich.console import Console

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.launcher.backends import slurm
from pdlaunch.launcher.backends.slurm import run_slurm
from pdlaunch.launcher.backends.slurm_lines import NodeDevices, node_error
from pdlaunch.launcher.serve import report_failure

FAKE_SRUN = r"""#!/bin/bash
export=${SRUN_EXPORT_ENV:-${SLURM_EXPORT_ENV:-ALL}}  # srun's --export: its flag, else these, SRUN_ first
for a in "$@"; do case $a in --relative=*) k=${a#--relative=} ;; --export=*) export=${a#--export=} ;; esac; done
echo $$ > "$FAKE_DIR/srun-$k.pid"
case $export in ALL|ALL,*) ;; *)  # the task gets SLURM_* only: slurm_node's own line when the deployment is missing
  echo "error: PDLAUNCH_SLURM_DEPLOYMENT is not set: this module is started by \`pdlaunch serve --backend slurm\`" >&2
  exit 1 ;; esac
[ -n "${SLURM_STDOUTMODE+set}" ] && exec > "$SLURM_STDOUTMODE"
if [ -n "${SLURM_LABELIO+set}" ]; then sed 's/^/0: /' "$FAKE_DIR/say-$k" 2>/dev/null
else cat "$FAKE_DIR/say-$k" 2>/dev/null; fi
[ -e "$FAKE_DIR/exit-$k" ] && exit "$(cat "$FAKE_DIR/exit-$k")"
trap 'exit 0' USR1 TERM
while :; do sleep 0.1 & wait $!; done
"""
SRUN_LINE = "srun: error: pdn2: task 0: Exited with exit code 1"


@pytest.fixture
def fake_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(FAKE_SRUN)
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setattr(slurm, "check_node_ports", lambda cfg: [])
    monkeypatch.setattr(slurm, "READY_TIMEOUT_S", 60.0)  # a launcher that missed the failure gives up sooner
    return tmp_path


def cfg(logs: Path) -> DeploymentConfig:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens: the proxy never answers
    return DeploymentConfig.model_validate({
        "launcher": {"backend": "slurm"}, "log_dir": str(logs), "proxy": {"host": "127.0.0.1", "port": port},
        "parallel": {"nodes": [{"address": "127.0.0.1"}, {"address": "127.0.0.2"}]}})


def launcher_says(fake_dir: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = run_slurm(cfg(fake_dir / "logs"))
    out = capsys.readouterr()
    return code, (out.out + out.err).splitlines()


def alive(fake_dir: Path) -> list[int]:
    pids = [int(p.read_text()) for p in fake_dir.glob("srun-*.pid") if p.read_text().strip()]
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    return alive


def test_a_node_resolving_auto_otherwise_than_node_0_stops_the_deployment(
        fake_dir: Path, term_guard: None, capsys: pytest.CaptureFixture[str]) -> None:
    (fake_dir / "say-0").write_text("node 0: device cuda\n")
    (fake_dir / "say-1").write_text("node 1: device cpu\n")
    code, lines = launcher_says(fake_dir, capsys)
    assert code == 1, lines
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: node 1: device: auto resolved to cpu on node 1 (127.0.0.2) but to cuda on node 0 (127.0.0.1)"), lines
    assert "node 1 sees no CUDA device" in errors[0], errors
    assert "stopped: every srun step ended" in lines and not any("Traceback" in line for line in lines), lines
    assert not alive(fake_dir), "a step was left running"


def test_steps_are_not_labelled_when_the_users_srun_labels(fake_dir: Path, term_guard: None,
                                                            capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_LABELIO", "1")  # the user's own `srun --label` habit, exported
    (fake_dir / "say-0").write_text("node 0: device cuda\n")
    (fake_dir / "say-1").write_text("node 1: device cpu\n")
    code, lines = launcher_says(fake_dir, capsys)
    assert code == 1, lines
    assert any(line.startswith("error: node 1: device: auto resolved to cpu on node 1") for line in lines), lines
    assert (fake_dir / "logs" / "slurm-node1.log").read_text() == "node 1: device cpu\n"
    assert not alive(fake_dir), "a step was left running"


def test_steps_output_reaches_their_log_when_the_users_srun_writes_to_a_file(
        fake_dir: Path, term_guard: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = fake_dir / "elsewhere.out"
    monkeypatch.setenv("SLURM_STDOUTMODE", str(elsewhere))  # `srun -o FILE`, exported for the user's own jobs
    (fake_dir / "say-0").write_text("node 0: device cuda\n")
    (fake_dir / "say-1").write_text("node 1: device cpu\n")
    code, lines = launcher_says(fake_dir, capsys)
    assert code == 1, lines
    assert any(line.startswith("error: node 1: device: auto resolved to cpu on node 1") for line in lines), lines
    assert (fake_dir / "logs" / "slurm-node1.log").read_text() == "node 1: device cpu\n"
    assert not elsewhere.exists() and not alive(fake_dir), lines


@pytest.mark.parametrize("variable", ["SLURM_EXPORT_ENV", "SRUN_EXPORT_ENV"])
def test_steps_get_the_deployment_when_the_batch_script_exports_nothing(
        fake_dir: Path, term_guard: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        variable: str) -> None:
    monkeypatch.setenv(variable, "NONE")  # `sbatch --export=NONE` leaves SLURM_EXPORT_ENV=NONE for the script's srun
    (fake_dir / "say-0").write_text("node 0: device cuda\n")
    (fake_dir / "say-1").write_text("node 1: device cpu\n")
    code, lines = launcher_says(fake_dir, capsys)
    assert code == 1, lines
    assert any(line.startswith("error: node 1: device: auto resolved to cpu on node 1") for line in lines), lines
    assert not any("PDLAUNCH_SLURM_DEPLOYMENT" in line for line in lines) and not alive(fake_dir), lines


def test_a_steps_error_line_is_the_launchers_error(fake_dir: Path, term_guard: None,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    said = ("error: node 1: device: cuda requested but no CUDA device is visible on this machine; use --device "
            "cpu (checked on node 1 (127.0.0.2))")
    (fake_dir / "say-1").write_text(f"{said}\n{SRUN_LINE}\n")
    (fake_dir / "exit-1").write_text("1")
    code, lines = launcher_says(fake_dir, capsys)
    assert code == 1, lines
    assert [line for line in lines if line.startswith("error:")] == [said], lines
    assert ("node 1's srun step (on 127.0.0.2, job 7) exited with code 1 while starting; stopping the deployment "
            f"(its output: {fake_dir / 'logs' / 'slurm-node1.log'})") in lines, lines
    assert not any(line.startswith("last ") for line in lines), lines  # the step's output says nothing more
    assert not any("Traceback" in line for line in lines) and not alive(fake_dir), lines


def test_a_step_ending_without_its_own_error_shows_its_output(fake_dir: Path, term_guard: None,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    (fake_dir / "say-1").write_text(f"node 1: device cpu\nKilled\n{SRUN_LINE}\n")
    (fake_dir / "exit-1").write_text("137")
    code, lines = launcher_says(fake_dir, capsys)
    assert code == 1, lines
    assert ("error: node 1's srun step (on 127.0.0.2, job 7) exited with code 137 while starting; stopping the "
            "deployment") in lines, lines
    assert "  Killed" in lines, lines  # the last lines of its output follow


def test_a_step_whose_instance_failed_shows_its_launchers_error_and_the_instances_lines(
        fake_dir: Path, term_guard: None, capsys: pytest.CaptureFixture[str]) -> None:
    """Node 1's launcher gave up on its decode (serve.report_failure: its error, then the last 20 lines of the
    decode's log), and srun added its own line: the batch process showed the last 20 lines of that output, which
    left out the node's error, the one line that says why (restarts off or spent, a role down)."""
    engine = [f"2026-11-29 INFO decode-0 engine: step {i}" for i in range(30)] + [
        "2026-11-29 ERROR decode-0 server: exiting: engine failed: CUDA error: out of memory"]
    written = io.StringIO()
    failed_child = types.SimpleNamespace(tail=lambda lines: engine[-lines:], log_path="logs/node1/decode-0.log")
    report_failure(Console(file=written, width=80), "decode-0 exited with code 1, and restarts are off for it "
                   "(instances[1].restart: false) (log: logs/node1/decode-0.log)", failed_child)  # type: ignore[arg-type]
    report = written.getvalue().splitlines()
    reason = report[0]
    assert reason.startswith("error: decode-0 exited with code 1") and len(report) == 22, report
    (fake_dir / "say-1").write_text("\n".join(["node 1: device cpu", *(f"INFO start {i}" for i in range(30)),
                                                *report, SRUN_LINE]) + "\n")
    (fake_dir / "exit-1").write_text("1")
    code, lines = launcher_says(fake_dir, capsys)
    assert code == 1, lines
    assert ("error: node 1's srun step (on 127.0.0.2, job 7) exited with code 1 while starting; stopping the "
            "deployment") in lines, lines
    assert f"  {reason}" in lines, lines
    shown = lines[lines.index(f"last 23 lines of {fake_dir / 'logs' / 'slurm-node1.log'}:") + 1:][:23]
    assert shown == [f"  {line}" for line in [*report, SRUN_LINE]], lines


def test_node_lines_are_read_whole_and_per_node(tmp_path: Path) -> None:
    logs = [tmp_path / "slurm-node0.log", tmp_path / "slurm-node1.log"]
    devices = NodeDevices(cfg(tmp_path), logs)
    assert devices.disagreement() is None  # nothing said yet
    logs[1].write_text("node 1: device cpu\n")
    assert devices.disagreement() is None  # node 0 has not said: no reference yet
    logs[0].write_text("node 1: device cuda\nnode 0: device cp")  # another node's line; a line still written
    assert devices.disagreement() is None
    with logs[0].open("a") as f:
        f.write("u\n")
    assert devices.disagreement() is None  # both on cpu
    agreed = NodeDevices(cfg(tmp_path), logs)
    logs[0].write_text("node 0: device cuda\n")
    found = agreed.disagreement()
    assert found is not None and found[0] == 1 and found[1].field == "device", found

    assert node_error(["error: node 0: x: y", "error: node 1: device: a", SRUN_LINE], 1) == "node 1: device: a"
    assert node_error(["error: instance decode-0 exited", SRUN_LINE], 1) is None


def test_lines_labelled_by_srun_are_read_too(tmp_path: Path) -> None:
    """A site's srun may still label (`--label` added by its own wrapper): `K: ` before each line, K the task."""
    logs = [tmp_path / "slurm-node0.log", tmp_path / "slurm-node1.log"]
    logs[0].write_text("0: node 0: device cuda\n")
    logs[1].write_text("  0: node 1: device cpu\n")
    found = NodeDevices(cfg(tmp_path), logs).disagreement()
    assert found is not None and found[0] == 1 and found[1].field == "device", found
    assert node_error(["0: error: node 1: device: a", f"0: {SRUN_LINE}"], 1) == "node 1: device: a"
    assert node_error(["0: node 1: device cpu", "10:error: node 1: x"], 1) is None
