"""`--backend ray`: a stop signal after the connect, in a real `python -m pdlaunch check-config` subprocess against a
real `ray start --head` (two fake GPUs: `--num-gpus 2`, so that check-config of a CUDA 1P1D deployment runs its GPU
probe; with one, the whole deployment's fit refuses it first).

- After the verdict, while the driver leaves the cluster: Ray's atexit hook (ray.shutdown) used to do that, and a
  Ctrl-C there printed "Exception ignored in atexit callback" and a KeyboardInterrupt traceback (a SIGTERM ended
  the process by the signal). Now the command leaves the cluster itself (launcher/backends/ray_connect_stop.py):
  one line, exit with the verdict's status.
- During the GPU probe's ray.get: raised inside Ray's code, the signal's exception came out as a SystemError and
  check-config reported a GPU it could not read (exit 1). Now the probe runs in a helper thread
  (config/ray_thread.py): one line naming it, exit 130 (no verdict).

The moment comes from a sitecustomize on the launcher's PYTHONPATH (test code only): it signals the launcher from
inside Ray's disconnect, or while the probe's ray.get waits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdlaunch.cli import STOPPED_CHECK_EXIT
from tests.cluster.ray_cluster import RayCluster, running_ray_head
from tests.serving.helpers import wait_for

pytest.importorskip("ray", reason="--backend ray needs the ray package (pip install 'pdlaunch[ray]')")

EXIT_TIMEOUT_S = 120.0  # the launcher importing pdlaunch and ray, connecting and checking, on a loaded machine
HOLD_S = 60.0  # how long the hook holds once it signalled: the process leaves meanwhile

# Ray's disconnect, which ray.shutdown calls (the atexit hook's or ours), signals the launcher first.
SITECUSTOMIZE_DISCONNECT = f"""\
import os, time
import ray._private.worker as worker

_disconnect = worker.disconnect


def disconnect(*args, **kwargs):
    os.kill(os.getpid(), int(os.environ["PDTEST_STOP_SIGNAL"]))
    deadline = time.monotonic() + {HOLD_S}
    while time.monotonic() < deadline:  # the process leaves meanwhile (unfixed: the signal raises here)
        time.sleep(0.05)
    return _disconnect(*args, **kwargs)


worker.disconnect = disconnect
"""

# The GPU probe's ray.get signals the launcher once it has waited a moment for the task (a fresh worker imports
# torch first: seconds), so that the signal arrives while ray.get waits.
SITECUSTOMIZE_PROBE = """\
import os, threading
import ray

_get = ray.get


def get(*args, **kwargs):
    threading.Timer(0.3, os.kill, (os.getpid(), int(os.environ["PDTEST_STOP_SIGNAL"]))).start()
    return _get(*args, **kwargs)


ray.get = get
"""


@pytest.fixture(scope="module")
def head() -> Iterator[RayCluster]:
    """One `ray start --head` with two (fake) GPUs under its own temporary directory: one per instance of 1P1D."""
    yield from running_ray_head("--num-gpus", "2")


def _check_config(head: RayCluster, tmp_path: Path, hook_text: str, device: str, sig: signal.Signals
                  ) -> tuple[int, str]:
    """`pdlaunch check-config` with `hook_text` as its sitecustomize, which sends `sig`; its exit code and output,
    once it was checked that its driver's job is dead on the cluster."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(hook_text)
    env = {**head.env, "PDTEST_STOP_SIGNAL": str(int(sig)),
           "PYTHONPATH": os.pathsep.join([str(hook), head.env["PYTHONPATH"]])}
    out = tmp_path / "launcher.out"
    with open(out, "wb") as file:
        proc = subprocess.Popen([sys.executable, "-m", "pdlaunch", "check-config", "--backend", "ray",
                                 "--ray-address", head.address, "--model", "tiny", "--device", device],
                                stdout=file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    try:
        code = proc.wait(EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"check-config still ran {EXIT_TIMEOUT_S:.0f}s on:\n{out.read_text(errors='replace')}") \
            from None
    output = out.read_text(errors="replace")

    def job_dead() -> bool:
        found = head.query(f"out = [j['IsDead'] for j in ray._private.state.jobs() if j['DriverPid'] == {proc.pid}]")
        assert isinstance(found, list)
        return all(found)

    wait_for(job_dead, f"the launcher's job (pid {proc.pid}) to be dead", EXIT_TIMEOUT_S, poll=1.0)
    return code, output


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_after_the_verdict_keeps_it_and_prints_no_traceback(head: RayCluster, tmp_path: Path,
                                                                   sig: signal.Signals) -> None:
    code, output = _check_config(head, tmp_path, SITECUSTOMIZE_DISCONNECT, "cpu", sig)
    assert "Traceback" not in output and "Exception ignored" not in output, output
    assert code == 0, f"exit {code}, not the verdict's:\n{output}"
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    assert lines[-2:] == ["valid", f"{sig.name} received while disconnecting from the Ray cluster; stopping"], output


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_during_the_gpu_probe_stops_the_check(head: RayCluster, tmp_path: Path, sig: signal.Signals) -> None:
    code, output = _check_config(head, tmp_path, SITECUSTOMIZE_PROBE, "cuda", sig)
    assert "Traceback" not in output and "SIGTERM received at time" not in output, output
    assert "could not read the memory of a GPU" not in output, output
    assert code == STOPPED_CHECK_EXIT, f"exit {code}:\n{output}"
    assert f"{sig.name} received while reading a GPU's memory on the Ray cluster; stopping (nothing was placed on " \
           "the cluster)" in " ".join(output.split()), output
