"""`pdlaunch bench kv-transfer` when one of its two worker processes dies (killed for memory, or by a user), and on
Ctrl-C: one error line naming the worker and how it ended (it was "Aborted." when the decode died, a worker's
traceback when the prefill died), exit 130 without a KeyboardInterrupt traceback from each worker on Ctrl-C, and no
process left running.

Real processes: the command runs in its own session, as a terminal's foreground job, so that a signal can go to the
whole process group as Ctrl-C sends it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# small and long: the command is still in its timed transfers when the test acts
ARGS = ["bench", "kv-transfer", "--device", "cpu", "--mode", "pull", "--num-tokens", "64", "--num-layers", "1",
        "--num-kv-heads", "1", "--head-dim", "8", "--block-size", "8", "--iterations", "1000000"]
START_S = 240.0  # two spawned workers importing torch and NIXL on a loaded two-core machine
EXIT_S = 120.0

pytestmark = pytest.mark.e2e


def _session(sid: int) -> list[int]:
    """Live processes of session `sid` (zombies left out: they run nothing)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def _workers(parent: int) -> list[int]:
    """The parent's spawned workers in start order (prefill, then decode: the decode starts once the prefill
    answered), by start time, not pid (pids wrap around)."""
    try:
        children = (Path(f"/proc/{parent}/task/{parent}/children")).read_text().split()
    except OSError:
        return []
    started = {}
    for pid in children:
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                stat = Path(f"/proc/{pid}/stat").read_text()
                started[int(pid)] = int(stat[stat.rindex(")") + 2:].split()[19])  # field 22, starttime
        except OSError:
            continue
    return sorted(started, key=started.__getitem__)


@contextmanager
def _bench(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], list[int]]]:
    """The command started, once both workers run; on the way out, nothing of it may be left running."""
    pytest.importorskip("nixl")
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | {"PYTHONPATH": str(REPO), "CI": "true"}
    with open(tmp_path / "out.txt", "wb") as out, open(os.devnull, "rb") as stdin:
        proc = subprocess.Popen([sys.executable, "-c", "from pdlaunch.cli import main; main()", *ARGS], stdin=stdin,
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + START_S
        while len(workers := _workers(proc.pid)) < 2:
            assert proc.poll() is None, (tmp_path / "out.txt").read_text()
            assert time.monotonic() < deadline, f"the two workers did not start within {START_S:g}s"
            time.sleep(0.2)
        yield proc, workers
        proc.wait(EXIT_S)
        deadline = time.monotonic() + EXIT_S
        while left := _session(proc.pid):
            assert time.monotonic() < deadline, f"still running {EXIT_S:g}s after the command ended: {left}"
            time.sleep(0.2)
    finally:
        for pid in _session(proc.pid):  # a failed test leaves nothing behind either
            os.kill(pid, signal.SIGKILL)
        proc.wait(EXIT_S)


def _errors(tmp_path: Path) -> list[str]:
    text = (tmp_path / "out.txt").read_text(errors="replace")
    assert "Traceback" not in text and "Aborted" not in text, text
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize(("which", "role"), [(0, "prefill"), (1, "decode")])
def test_a_killed_worker_is_named_with_how_it_ended(tmp_path: Path, which: int, role: str) -> None:
    with _bench(tmp_path) as (proc, workers):
        os.kill(workers[which], signal.SIGKILL)
    assert proc.returncode == 1
    errors = _errors(tmp_path)
    assert len(errors) == 1 and errors[0].startswith(
        f"error: kv-transfer bench: the {role} worker was killed by signal 9 (SIGKILL)"), errors


def test_ctrl_c_exits_130_without_a_traceback_from_the_workers(tmp_path: Path) -> None:
    with _bench(tmp_path) as (proc, _):
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: every process of the job gets it
    assert proc.returncode == 130
    assert _errors(tmp_path) == []
