"""Each `--backend slurm` step asks SLURM for every GPU the job has on its node (launcher/backends/slurm_gres.py),
and a node's step that sees fewer GPUs than its ranks need says so in SLURM's terms (slurm_node_gpus.py).

Left to SLURM's defaults, a one-task step gets no GPU of an `sbatch --exclusive` job, one GPU of a
`--gpus-per-task=1` job, and no step at all of a `--gpus=N` job (srun reads SLURM_GPUS=N as the step's own request
of one node): seen on SLURM 22.05 with the fake-GPU cluster below. The unit tests read the job's GPUs per node as
`scontrol show job -d` prints them (taken from that cluster) and check the steps' srun argv and environment with a
stand-in srun and scontrol; the e2e test runs the launcher under salloc on a real two-node cluster whose nodes
have two fake GPUs each (gres.conf File=/dev/null, ...: no CUDA device behind them), so each step sees the GPUs
SLURM gave it only in SLURM_GPUS_ON_NODE / CUDA_VISIBLE_DEVICES, and CUDA none."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.launcher.backends import slurm
from pdlaunch.launcher.backends.slurm import run_slurm, srun_argv
from pdlaunch.launcher.backends.slurm_gres import (
    GPU_REQUEST_ENV,
    SLURM_DEFAULT,
    NodeGres,
    gpus_by_node_list,
    gres_by_node_list,
    gres_gpus,
    node_gres,
)
from pdlaunch.launcher.backends.slurm_node import node_config
from pdlaunch.launcher.backends.slurm_node_gpus import gpus_needed
from tests.cluster.slurm_cluster import SlurmCluster, running_slurm
from tests.helpers.ports import free_port

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 300.0

# `scontrol show job -d --oneliner` on SLURM 22.05 (the fake-GPU cluster below): `sbatch -N2 --exclusive`, then
# `sbatch -N2` on nodes without GRES
EXCLUSIVE = ("JobId=2 JobName=job.sh NodeList=pdn[1-2] BatchHost=pdn1 NumNodes=2 NumCPUs=4 JOB_GRES=gpu:4   "
             "Nodes=pdn[1-2] CPU_IDs=0-1 Mem=0 GRES=gpu:2(IDX:0-1) MinCPUsNode=1 OverSubscribe=NO")
NO_GPUS = ("JobId=6 JobName=job.sh NodeList=pdn[1-2] BatchHost=pdn1 NumNodes=2 JOB_GRES=(null)   "
           "Nodes=pdn[1-2] CPU_IDs=0 Mem=0 GRES= MinCPUsNode=1")


def test_a_nodes_gres_counts_its_gpus_in_each_form_scontrol_prints() -> None:
    assert gres_gpus("gpu:2(IDX:0-1)") == 2
    assert gres_gpus("gpu:a100:2(IDX:0,2),nic:1(IDX:0)") == 2  # typed GPUs beside another GRES
    assert gres_gpus("gpu:a100:1(IDX:0),gpu:v100:2(IDX:1-2)") == 3
    assert gres_gpus("gpu(IDX:0-1,3)") == 3  # before 20.11: the indices only
    assert gres_gpus("") == 0 and gres_gpus("(null)") == 0
    assert gres_gpus("nic:1(IDX:0)") == 0  # other GRES only: the step asks for them (and no GPU)
    assert gres_gpus("gpu(CNT:2)") == 2  # GPUs without device files
    assert gres_gpus("shard:2") is None and gres_gpus("mps:100") is None  # they carry GPUs: --gres=none drops them


def test_the_jobs_gpus_per_node_come_from_its_node_details() -> None:
    assert gpus_by_node_list(EXCLUSIVE) == [("pdn[1-2]", 2)]  # the GPUs an exclusive job has implicitly
    assert gpus_by_node_list(NO_GPUS) == [("pdn[1-2]", 0)]
    uneven = ("JOB_GRES=gpu:3 Nodes=a1 CPU_IDs=0 Mem=0 GRES=gpu:2(IDX:0-1) Nodes=a2 CPU_IDs=0 Mem=0 "
              "GRES=gpu:1(IDX:0) Nodes=a3 CPU_IDs=0 Mem=0 MinCPUsNode=1")
    assert gpus_by_node_list(uneven) == [("a1", 2), ("a2", 1), ("a3", 0)]
    assert gpus_by_node_list("JobId=7 JobState=RUNNING NodeList=a1") == []  # no details: SLURM's default


def test_each_step_asks_for_its_nodes_gpus_or_none() -> None:
    assert "--gres=gpu:8" in srun_argv(1, 72, NodeGres(8))
    assert "--gres=none" in srun_argv(1, 72, NodeGres(0))  # a step asking GPUs of a job without GRES is refused
    assert not any(arg.startswith("--gres") for arg in srun_argv(1, 72, SLURM_DEFAULT))  # unknown, or shards


def test_a_nodes_other_gres_stay_in_its_steps_request() -> None:
    """A step that names GRES gets those alone (the job's request is copied to a step that names none): the node's
    other GRES, typed or count-only, go with its GPUs, and a node with only other GRES asks for those."""
    assert node_gres("gpu:a100:2(IDX:0,2),nvme:1(IDX:0),nic:mlx:2(IDX:0-1)") == NodeGres(2, ("nvme:1", "nic:mlx:2"))
    assert node_gres("gpu:2(IDX:0-1),nvme:1(IDX:0),bw(CNT:4)") == NodeGres(2, ("nvme:1", "bw:4"))  # bw: count-only
    # (22.05, the fake cluster of the e2e test below)
    assert node_gres("nic(IDX:0,2)") == NodeGres(0, ("nic:2",))  # before 20.11: the indices only
    assert node_gres("shard:2(IDX:0),nvme:1(IDX:0)") == SLURM_DEFAULT  # GPU shards: SLURM's default keeps them
    assert "--gres=gpu:8,nvme:1" in srun_argv(1, 72, NodeGres(8, ("nvme:1",)))
    assert "--gres=nvme:1" in srun_argv(1, 72, NodeGres(0, ("nvme:1",)))  # --gres=none would drop the nvme
    # a GRES the job asked for per node that no node's details list: its per-node request names it
    details = ("JobId=7 JOB_GRES=gpu:4 TresPerNode=gres:gpu:2,gres:bw:4G,gres:nvme:1,gres:scratch:0 Nodes=pdn[1-2] "
               "CPU_IDs=0-1 Mem=0 GRES=gpu:2(IDX:0-1),nvme:1(IDX:0)")
    assert gres_by_node_list(details) == [("pdn[1-2]", NodeGres(2, ("nvme:1", "bw:4G")))]
    assert gres_by_node_list(details.replace("gres:", "gres/")) == gres_by_node_list(details)  # 23.02+


# srun: writes its argv and the GPU variables of its environment to FAKE_DIR/srun-K, then fails as a step whose
# node refused the deployment does (so the launcher stops at once). scontrol: the job's details (FAKE_DIR/details)
# and the nodes of a host list.
FAKE_SRUN = r"""#!/bin/bash
for a in "$@"; do case $a in --relative=*) k=${a#--relative=} ;; esac; done
{ echo "$*"; env | grep -E '^SLURM_(GPUS|GRES|STEP_GRES|TRES_PER_TASK|CPUS_PER_GPU|MEM_PER_GPU)' | sort; } \
  > "$FAKE_DIR/srun-$k"
echo "error: node $k: device: stand-in step" >&2
exit 1
"""
FAKE_SCONTROL = r"""#!/bin/bash
case "$1 $2" in
  "show job") cat "$FAKE_DIR/details" ;;
  "show hostnames") [ "$3" = "pdn[1-2]" ] && printf 'pdn1\npdn2\n' || echo "$3" ;;
  *) exit 1 ;;
esac
"""


@pytest.fixture
def fake_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, script in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        path = bin_dir / name
        path.write_text(script)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "pdn[1-2]")
    monkeypatch.setattr(slurm, "check_node_ports", lambda cfg: [])
    return tmp_path


def two_nodes(logs: Path) -> DeploymentConfig:
    return DeploymentConfig.model_validate({
        "launcher": {"backend": "slurm"}, "log_dir": str(logs), "proxy": {"host": "127.0.0.1", "port": free_port()},
        "parallel": {"nodes": [{"address": "127.0.0.1"}, {"address": "127.0.0.2"}]}})


@pytest.mark.parametrize("job_env", [
    {"SLURM_GPUS": "4"},  # sbatch --gpus=4: srun would ask 4 GPUs of the step's one node
    {"SLURM_GPUS_PER_TASK": "1", "SLURM_TRES_PER_TASK": "gres/gpu:1"},  # --gpus-per-task=1: one GPU per step
    {"SLURM_STEP_GRES": "none"},  # a user's habit for other jobs: steps without GPUs
])
def test_the_steps_ask_for_the_jobs_gpus_on_their_node_and_not_the_jobs_gpu_options(
        fake_dir: Path, term_guard: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        job_env: dict[str, str]) -> None:
    for name, value in job_env.items():
        monkeypatch.setenv(name, value)
    (fake_dir / "details").write_text(EXCLUSIVE.replace("Nodes=pdn[1-2]", "Nodes=pdn1")
                                      + " Nodes=pdn2 CPU_IDs=0 Mem=0 GRES=gpu:1(IDX:0)\n")
    assert run_slurm(two_nodes(fake_dir / "logs")) == 1
    text = capsys.readouterr().out
    steps = [(fake_dir / f"srun-{k}").read_text().splitlines() for k in (0, 1)]
    assert " --gres=gpu:2 " in steps[0][0] and " --gres=gpu:1 " in steps[1][0], steps
    assert steps[0][1:] == [] and steps[1][1:] == [], steps  # none of the job's GPU options reach srun
    assert set(job_env) <= set(GPU_REQUEST_ENV)
    assert "(GPUs of each: 2, 1)" in text, text


def test_steps_of_a_job_without_gpus_ask_for_none(fake_dir: Path, term_guard: None,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    (fake_dir / "details").write_text(NO_GPUS + "\n")
    assert run_slurm(two_nodes(fake_dir / "logs")) == 1
    assert " --gres=none " in (fake_dir / "srun-0").read_text().splitlines()[0]
    assert "GPUs of each" not in capsys.readouterr().out


def test_the_steps_keep_the_jobs_other_gres_beside_its_gpus(fake_dir: Path, term_guard: None,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`sbatch -N2 --gres=gpu:2,nvme:1,bw:4G`, bw not in the node details: a step asking `--gres=gpu:2` alone would
    lose the nvme and the bandwidth the job holds on its node."""
    (fake_dir / "details").write_text(
        "JobId=7 JOB_GRES=gpu:4,nvme:2 TresPerNode=gres:gpu:2,gres:nvme:1,gres:bw:4G Nodes=pdn1 CPU_IDs=0-1 Mem=0 "
        "GRES=gpu:2(IDX:0-1),nvme:1(IDX:0) Nodes=pdn2 CPU_IDs=0-1 Mem=0 GRES=nvme:1(IDX:0)\n")
    assert run_slurm(two_nodes(fake_dir / "logs")) == 1
    steps = [(fake_dir / f"srun-{k}").read_text().splitlines()[0] for k in (0, 1)]
    assert " --gres=gpu:2,nvme:1,bw:4G " in steps[0] and " --gres=nvme:1,bw:4G " in steps[1], steps
    assert "(GPUs of each: 2, 0)" in capsys.readouterr().out


def test_without_node_details_the_steps_take_slurms_default_and_the_launcher_says_so(
        fake_dir: Path, term_guard: None, capsys: pytest.CaptureFixture[str]) -> None:
    (fake_dir / "details").write_text("JobId=7 JobState=RUNNING NodeList=pdn[1-2]\n")
    assert run_slurm(two_nodes(fake_dir / "logs")) == 1
    assert "--gres" not in (fake_dir / "srun-0").read_text().splitlines()[0]
    out = capsys.readouterr().out
    assert "warning: could not read job 7's GPUs per node" in out and "--gres=gpu:N" in out, out


def spanning(device: str = "cuda") -> DeploymentConfig:
    """1P1D on two nodes, node 0 listing one GPU: the decode's TP 2 group spans both, node 1 also runs the prefill."""
    return DeploymentConfig.model_validate({
        "launcher": {"backend": "slurm"}, "device": device, "model": {"path": "tiny"},
        "parallel": {"nodes": [{"address": "127.0.0.1", "devices": [0]}, {"address": "127.0.0.2"}]},
        "instances": [{"role": "prefill", "count": 1, "tp": 1, "node": 1},
                      {"role": "decode", "count": 1, "tp": 2, "node": 0}]})


def test_a_nodes_need_counts_the_ranks_spanning_groups_place_there() -> None:
    cfg = spanning()
    assert [gpus_needed(cfg, k) for k in (0, 1)] == [1, 2]
    cfg.parallel.nodes[0].devices = [3]
    assert gpus_needed(cfg, 0) == 4  # a listed device must exist: CUDA index 3 of 0..3


@pytest.mark.skipif(sys.platform != "linux", reason="the step's CUDA check runs on Linux nodes")
def test_a_step_without_the_gpus_its_node_needs_says_what_slurm_gave_it(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    """No CUDA device here: the step sees none. Its one problem names the node, what it saw and SLURM gave it,
    what the node needs, and the sbatch option; validation's own GPU count problems for it are left out."""
    cfg = spanning()
    cfg.log_dir = str(tmp_path / "logs")
    for name in ("SLURM_GPUS_ON_NODE", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(Exception) as raised:
        node_config(cfg.model_dump_json(), 1)
    text = str(raised.value)
    assert text.startswith("parallel.nodes[1]: node 1 (127.0.0.2) needs 2 GPU(s) for the ranks the deployment "
                           "places there, but its srun step sees 0 (SLURM_GPUS_ON_NODE unset, CUDA_VISIBLE_DEVICES "
                           "unset); allocate the GPUs with the job: sbatch/salloc --gres=gpu:2"), text
    assert "no CUDA device is visible" not in text and "this machine has 0" not in text, text
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "2")  # SLURM gave it GPUs that CUDA does not see
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(Exception) as raised:
        node_config(cfg.model_dump_json(), 1)
    assert "(SLURM_GPUS_ON_NODE=2, CUDA_VISIBLE_DEVICES=0,1); SLURM gave the step 2 GPU(s) but CUDA sees 0" \
        in str(raised.value), raised.value


@pytest.fixture(scope="module")
def gpu_slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    yield from running_slurm(tmp_path_factory.mktemp("slurm-gres"), gpus_per_node=2)


@pytest.mark.e2e
@pytest.mark.parametrize("allocation", [["--gpus=4"], ["--exclusive"]])
def test_each_step_gets_its_nodes_gpus_from_slurm(gpu_slurm: SlurmCluster, tmp_path: Path,
                                                   allocation: list[str]) -> None:
    """`salloc --gpus=4` (SLURM's default: no step at all) and `salloc --exclusive` (no GPU for the steps): each
    node's step gets the job's two GPUs there, as its error line shows (CUDA sees none of the fake GPUs)."""
    env = {**gpu_slurm.env, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    config = tmp_path / "pd.yaml"  # a rank on each node: whichever node's step stops first needs a GPU
    config.write_text("launcher: {backend: slurm}\ndevice: cuda\nmodel: {path: tiny}\ninstances:\n"
                      "  - {role: prefill, count: 1, tp: 1, node: 1}\n  - {role: decode, count: 1, tp: 1, node: 0}\n")
    done = subprocess.run(["salloc", "--nodes=2", *allocation, sys.executable, "-m", "pdlaunch", "serve", str(config),
                           "--port", str(free_port()), "--log-dir", str(tmp_path / "logs")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=START_TIMEOUT_S)
    text = done.stdout + done.stderr
    assert done.returncode == 1, text
    assert "(GPUs of each: 2, 2)" in text, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    assert re.match(r"error: node ([01]): parallel\.nodes\[\1\]: node \1 \(127\.0\.0\.[12]\) needs 1 GPU\(s\) .* its "
                    r"srun step sees 0 \(SLURM_GPUS_ON_NODE=2, CUDA_VISIBLE_DEVICES=0,1\); SLURM gave the step 2 GPU",
                    errors[0]), text
    assert "stopped: every srun step ended" in text and "Traceback" not in text, text


# Under salloc: each node's step as the launcher builds it (step_gpus, srun_argv), running `scontrol show step` on
# itself in place of the node's launcher: what SLURM gave the step.
SHOW_STEPS = """
import os, subprocess, sys
from rich.console import Console
from pdlaunch.launcher.backends.slurm import srun_argv, step_gpus
gres = step_gpus(Console(), os.environ["SLURM_JOB_ID"], 2)
for k, node in enumerate(gres):
    argv = srun_argv(k, None, node)
    argv = argv[:argv.index("-m") - 1] + ["bash", "-c", "scontrol show step $SLURM_JOB_ID.$SLURM_STEP_ID --oneliner"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    print(f"step {k} ({done.returncode}): {done.stdout.strip()} {done.stderr.strip()}")
"""


@pytest.fixture(scope="module")
def gres_slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    yield from running_slurm(tmp_path_factory.mktemp("slurm-other-gres"), gpus_per_node=2, other_gres=True)


@pytest.mark.e2e
@pytest.mark.parametrize(("allocation", "bw"), [(["--gres=gpu:2,nvme:1,bw:4"], 4), (["--exclusive"], 8)])
def test_each_step_keeps_the_jobs_other_gres_on_its_node(gres_slurm: SlurmCluster, allocation: list[str],
                                                         bw: int) -> None:
    """Nodes with two fake GPUs, an nvme (a device file) and 8 of bw (count-only): each step the launcher builds asks
    SLURM for the GPUs and the other GRES the job has on its node, and SLURM gives it them all."""
    env = {**gres_slurm.env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(["salloc", "--nodes=2", *allocation, sys.executable, "-c", SHOW_STEPS], env=env,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=START_TIMEOUT_S)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text
    for k in (0, 1):
        assert re.search(rf"step {k} \(0\): StepId=\d+\.\d+ .*TresPerNode=gres:gpu:2,gres:nvme:1,gres:bw:{bw}\b",
                         text), text
