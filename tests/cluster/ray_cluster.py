"""A real Ray cluster on this machine for tests: a head and two worker raylets, each on its own node
address (loopback aliases 127.0.0.2 / 127.0.0.3 for the workers; Ray may report the head at the
machine's own address), each with a custom resource the tests pin roles with. Small: two CPUs per node,
an 80 MB object store, no dashboard. Everything lives under one short temporary directory, and `stop`
kills exactly the processes of this cluster (found by that directory), never another Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.cluster.running import running
from tests.helpers.pids import signal_pid
from tests.helpers.ports import free_port

WORKERS = {"127.0.0.2": "pd_decode", "127.0.0.3": "pd_decode"}
HEAD_RESOURCE = "pd_prefill"
START_TIMEOUT_S = 120.0
COMMON = ["--num-cpus", "2", "--object-store-memory", "80000000", "--disable-usage-stats"]


class RayUnavailable(Exception):
    pass


def _ray_bin() -> str:
    found = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if found is None:
        raise RayUnavailable("the `ray` command is not installed (pip install 'pdlaunch[ray]')")
    return found


class RayCluster:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="pdray", dir="/tmp"))  # unix socket paths stay short
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        repo = str(Path(__file__).resolve().parents[2])
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
                    "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}

    def _ray(self, *commands: list[str]) -> None:
        """Run `ray ARGS` for each of `commands`, side by side; RayUnavailable if one fails."""
        procs = [(args, subprocess.Popen([_ray_bin(), *args], env=self.env, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True)) for args in commands]
        for args, proc in procs:
            try:
                out, _ = proc.communicate(timeout=START_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            if proc.returncode != 0:
                raise RayUnavailable(f"`ray {' '.join(args)}` failed: {out[-2000:]}")

    def start_head(self, *args: str) -> None:
        """`ray start --head` on 127.0.0.1 under this cluster's directory, with `args` added."""
        self._ray(["start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(self.port),
                   "--temp-dir", str(self.root), "--include-dashboard", "false", *COMMON, *args])

    def start(self) -> None:
        self.start_head("--resources", json.dumps({HEAD_RESOURCE: 1}))
        for address, resource in WORKERS.items():  # one at a time: two raylets joining at once may time out
            self._ray(["start", "--address", self.address, "--node-ip-address", address,
                       "--resources", json.dumps({resource: 1}), *COMMON])
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(self.nodes()) < 1 + len(WORKERS):
            if time.monotonic() > deadline:
                raise RayUnavailable(f"the cluster did not show 3 live nodes within {START_TIMEOUT_S:.0f}s: "
                                     f"{self.nodes()}")
            time.sleep(0.5)

    def query(self, code: str) -> object:
        """Run `code` (which sets `out`) in a driver connected to the cluster; `out` as JSON."""
        script = (f"import json, ray\nray.init(address={self.address!r}, log_to_driver=False, "
                  f"logging_level='ERROR')\n{code}\nprint('OUT' + json.dumps(out))\n")
        done = subprocess.run([sys.executable, "-c", script], env=self.env, capture_output=True, text=True,
                              timeout=120)
        for line in done.stdout.splitlines():
            if line.startswith("OUT"):
                return json.loads(line[3:])
        raise AssertionError(f"the ray query failed: {done.stderr[-2000:]}")

    def nodes(self) -> dict[str, dict[str, float]]:
        """Live nodes: address -> total resources."""
        out = self.query("out = {n['NodeManagerAddress']: n['Resources'] for n in ray.nodes() if n['Alive']}")
        assert isinstance(out, dict)
        return out

    def _processes(self) -> dict[int, tuple[int, str]]:
        """pid -> (parent pid, full command line), from /proc (ps may cut long command lines)."""
        procs = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue  # ended meanwhile
            procs[int(entry.name)] = (ppid, args)
        return procs

    def _tree(self, roots: set[int]) -> set[int]:
        procs = self._processes()
        found = set(roots)
        grew = True
        while grew:
            more = {pid for pid, (ppid, _) in procs.items() if ppid in found and pid not in found}
            found |= more
            grew = bool(more)
        return found

    def raylet_of(self, address: str) -> int:
        for pid, (_, args) in self._processes().items():
            if args.split(" ")[0].endswith("/raylet") and f"--node_ip_address={address} " in f"{args} " \
                    and str(self.root) in args:
                return pid
        raise AssertionError(f"no raylet of this cluster runs on {address}")

    def kill_node(self, address: str) -> None:
        """SIGKILL the raylet on `address` and every process under it (its workers: the actors there)."""
        for pid in self._tree({self.raylet_of(address)}):
            signal_pid(pid, signal.SIGKILL)

    def kill_processes(self, marker: str) -> int:
        """SIGKILL every process whose command line contains `marker` (an actor: "ray::RayRank"); how many."""
        pids = [pid for pid, (_, args) in self._processes().items() if marker in args]
        for pid in pids:
            signal_pid(pid, signal.SIGKILL)
        return len(pids)

    def processes(self, marker: str) -> list[str]:
        """Command lines of the processes that contain `marker`."""
        return [args for _, args in self._processes().values() if marker in args]

    def stop(self) -> None:
        """SIGKILL every process of this cluster (those naming its directory, and their children), as `ray stop
        --force` does. A SIGTERM first bought nothing: the GCS server, the raylets, their runtime-env agents and
        the autoscaler monitor were all still up 6 s after it, so every stop waited out a 5 s deadline and then
        killed them anyway (20 s summed over a `make test`)."""
        mine = {pid for pid, (_, args) in self._processes().items() if str(self.root) in args and pid != os.getpid()}
        for pid in self._tree(mine):
            signal_pid(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


class RayHead(RayCluster):
    """A head alone (no worker raylets), started with `args` added to `ray start --head`."""

    def __init__(self, *args: str) -> None:
        super().__init__()
        self.args = args

    def start(self) -> None:
        self.start_head(*self.args)


def running_ray_head(*args: str) -> Iterator[RayCluster]:
    """A module fixture's body: a started head alone (RayHead; the test skipped, saying why, where Ray cannot run
    here), stopped after the last test."""
    return running(RayHead(*args), RayUnavailable, "a Ray head")


def running_ray() -> Iterator[RayCluster]:
    """A module fixture's body: a started cluster (the test skipped, saying why, where Ray cannot run here),
    stopped after the last test."""
    return running(RayCluster(), RayUnavailable, "a Ray cluster")
