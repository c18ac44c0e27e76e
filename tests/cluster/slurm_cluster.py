"""A real SLURM cluster on this machine for tests: munged, slurmctld and two slurmd "nodes" (pdn1 at
127.0.0.1, pdn2 at 127.0.0.2, each slurmd on its own port), all in a temporary directory.

Needs root (slurmd runs jobs as their user) and Debian's slurmctld, slurmd, slurm-client and munge
packages (`make venv` installs them where it may); `SlurmUnavailable` says what is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.cluster.running import running
from tests.helpers.pids import pid_alive, signal_pid
from tests.helpers.ports import free_ports

NODES = {"pdn1": "127.0.0.1", "pdn2": "127.0.0.2"}
START_TIMEOUT_S = 90.0
FAKE_GPU_FILES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/urandom")  # gres.conf File= of the fake GPUs
# other GRES (other_gres): gres.conf lines; an nvme with a device file, and bw, count-only (no file: `bw(CNT:N)` in
# scontrol's node details)
OTHER_GRES = {"nvme": "Name=nvme File=/dev/random\n", "bw": "Name=bw Count=8 Flags=CountOnly\n"}
NODE_GRES = {"gpu": "gpu:{gpus}", "nvme": "nvme:1", "bw": "bw:8"}  # slurm.conf Gres= of each node
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo", "scancel", "srun")


class SlurmUnavailable(Exception):
    pass


class SlurmCluster:
    """`gpus_per_node`: each node's GRES of fake GPUs (gres.conf, AutoDetect=off: devices that exist and are no
    GPU, as `man gres.conf` allows), so jobs get GPU IDs and steps SLURM_GPUS_ON_NODE / CUDA_VISIBLE_DEVICES.
    `other_gres`: each node also has OTHER_GRES, a GRES with a device file and a count-only one."""

    def __init__(self, root: Path, gpus_per_node: int = 0, other_gres: bool = False) -> None:
        self.root = root
        self.gpus_per_node = gpus_per_node
        self.other_gres = other_gres
        self.conf = root / "etc" / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._pid_files: list[Path] = []

    def start(self) -> None:
        missing = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
        if missing:
            raise SlurmUnavailable(f"not installed: {', '.join(missing)} (Debian: slurmctld slurmd slurm-client munge)")
        if os.geteuid() != 0:
            raise SlurmUnavailable("slurmd must run as root to start jobs")
        for sub in ("etc", "state", "spool", "log", "run", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        key = self.root / "etc" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        (self.root / "munge").chmod(0o755)
        socket_path, r = self.root / "munge" / "munge.socket", self.root
        self._daemon(["munged", "--force", f"--socket={socket_path}", f"--key-file={key}",
                      f"--log-file={r / 'log' / 'munged.log'}", f"--pid-file={r / 'run' / 'munged.pid'}",
                      f"--seed-file={r / 'state' / 'munged.seed'}"], r / "run" / "munged.pid")
        ctld_port, *node_ports = free_ports(1 + len(NODES))
        names = ["gpu"] * bool(self.gpus_per_node) + list(OTHER_GRES) * self.other_gres
        gres = f" Gres={','.join(NODE_GRES[name].format(gpus=self.gpus_per_node) for name in names)}" if names else ""
        nodes = "\n".join(f"NodeName={name} NodeAddr={addr} NodeHostname={name} Port={port} CPUs=2{gres} State=UNKNOWN"
                          for (name, addr), port in zip(NODES.items(), node_ports))
        if names:
            files = FAKE_GPU_FILES[:self.gpus_per_node]
            (self.root / "etc" / "gres.conf").write_text("AutoDetect=off\n" + "".join(f"Name=gpu File={f}\n"
                                                                                     for f in files)
                                                         + "".join(OTHER_GRES.values()) * self.other_gres)
        self.conf.write_text(f"""\
ClusterName=pdtest{ctld_port}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
AuthInfo=socket={socket_path}
MpiDefault=none
{f"GresTypes={','.join(names)}" if names else ""}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
{nodes}
PartitionName=pd Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        self._daemon(["slurmctld", "-i", "-f", str(self.conf)], r / "run" / "slurmctld.pid")
        for name in NODES:
            self._daemon(["slurmd", "-N", name, "-f", str(self.conf)], r / "run" / f"slurmd-{name}.pid")
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.idle_nodes() < len(NODES):
            if time.monotonic() > deadline:
                raise AssertionError(f"SLURM nodes not idle after {START_TIMEOUT_S:.0f}s:\n{self.logs()}")
            time.sleep(0.5)

    def _daemon(self, argv: list[str], pid_file: Path) -> None:
        self._pid_files.append(pid_file)
        done = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise AssertionError(f"{argv[0]} failed to start ({done.returncode}): {done.stderr}\n{self.logs()}")

    def run(self, *argv: str) -> str:
        done = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr}"
        return done.stdout

    def idle_nodes(self) -> int:
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True,
                              timeout=30)
        return done.stdout.split().count("idle") if done.returncode == 0 else 0

    def job_state(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` fields (JobState, ExitCode, ...), {} once slurmctld forgot the job."""
        done = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], env=self.env, capture_output=True,
                              text=True, timeout=30)
        return dict(w.split("=", 1) for w in done.stdout.split() if "=" in w) if done.returncode == 0 else {}

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted((self.root / "log").glob("*.log")))

    def stop(self) -> None:
        """SIGTERM each daemon we started (by its pid file), then SIGKILL what is left after 20 s."""
        pids = []
        for pid_file in reversed(self._pid_files):
            try:
                pids.append(int(pid_file.read_text().strip()))
            except (OSError, ValueError):
                continue
        for pid in pids:
            signal_pid(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in pids:
            signal_pid(pid, signal.SIGKILL)


def running_slurm(root: Path, gpus_per_node: int = 0, other_gres: bool = False) -> Iterator[SlurmCluster]:
    """A module fixture's body: a started cluster under `root` (the test skipped, saying why, where SLURM
    cannot run here), stopped after the last test."""
    return running(SlurmCluster(root, gpus_per_node, other_gres), SlurmUnavailable, "a SLURM cluster")
