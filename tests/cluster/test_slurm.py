"""`--backend slurm` on a real SLURM cluster (slurmctld + two slurmd nodes on this machine): the example
sbatch script serves 1P1D across the two nodes (the prefill on the second, the decode's TP 2 group
spanning both: its rank 1 is started by the second node's step and joins rank 0's rendezvous on the
first), answers equal a colocated engine's, the KV crosses from prefill to decode, and
`scancel --signal=TERM --batch` stops every node cleanly; its `device: auto` is resolved by each node's step
(cpu on both here), not by the batch script. Under salloc a node's failed check is the launcher's one error
line (a node without the GPUs its ranks need says so in SLURM's terms). Outside an allocation the backend is an error.

Both "nodes" share this machine's kernel, so only one TP group may rendezvous (the port plan numbers
rendezvous ports per node, from parallel.master_port on each)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pdlaunch.engine.llm import LLM
from pdlaunch.engine.outputs import SamplingParams
from tests.cluster.slurm_cluster import NODES, SlurmCluster, running_slurm
from tests.config.cli_helpers import check
from tests.helpers.ports import free_port, free_ports
from tests.multinode.two_node_run import NUM_BLOCKS, PROMPTS, completion, kv_bytes_received
from tests.serving.helpers import wait_for

REPO = Path(__file__).resolve().parents[2]
SBATCH_SCRIPT = REPO / "examples" / "slurm" / "pd-1p1d.sbatch"
START_TIMEOUT_S = 300.0  # slurm steps, then two launchers importing torch and building engines on 2 cores
STOP_TIMEOUT_S = 120.0
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    yield from running_slurm(tmp_path_factory.mktemp("slurm"))


def test_slurm_backend_outside_an_allocation_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        monkeypatch.delenv(var, raising=False)
    result = check([str(REPO / "examples" / "slurm" / "pd-1p1d.yaml"), "--model", "tiny", "--device", "cpu"])
    assert result.exit_code == 1
    assert "launcher.backend" in result.output and "inside a SLURM allocation" in result.output
    result = check(["--model", "tiny", "--device", "cpu", "--backend", "slurm"])
    assert result.exit_code == 1 and "--backend" in result.output and "sbatch" in result.output


@pytest.mark.e2e
@pytest.mark.slow
def test_sbatch_example_serves_1p1d_across_two_nodes(slurm: SlurmCluster, llama_ckpt: Path, tmp_path: Path) -> None:
    proxy_port, prefill_port, decode_port, master_port = free_ports(4)
    config = tmp_path / "pd.yaml"
    config.write_text(f"""\
launcher: {{backend: slurm}}
device: auto  # each node resolves it (the batch process does not): cpu on both here
model: {{path: "{llama_ckpt}"}}
cache: {{num_gpu_blocks: {NUM_BLOCKS}}}
kv_transfer: {{connector: nixl, side_channel_host: 0.0.0.0}}
proxy: {{host: 127.0.0.1, port: {proxy_port}}}
log_dir: {tmp_path / "logs"}
parallel:  # one rank slot on the first node: the decode's TP group spans both nodes
  nodes: [{{address: 127.0.0.1, devices: [0]}}, {{address: 127.0.0.1}}]
  master_port: {master_port}
instances:
  - {{role: prefill, count: 1, tp: 1, node: 1, base_port: {prefill_port}}}
  - {{role: decode, count: 1, tp: 2, node: 0, base_port: {decode_port}}}
""")
    out = tmp_path / "job.out"
    env = {**slurm.env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("UCX_NET_DEVICES", None)  # both nodes' addresses are loopback ones, not only `lo`'s 127.0.0.1
    submitted = subprocess.run(["sbatch", "--parsable", f"--output={out}", f"--chdir={REPO}", str(SBATCH_SCRIPT),
                                str(config)], env=env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    proxy = f"http://127.0.0.1:{proxy_port}"

    def output() -> str:
        return out.read_text(errors="replace") if out.exists() else ""

    try:
        def ready() -> bool:
            state = slurm.job_state(job).get("JobState", "")
            assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} is {state}:\n{output()}"
            try:
                return httpx.get(f"{proxy}/health", timeout=2, trust_env=False).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, "the proxy of the sbatch job to see both nodes ready", START_TIMEOUT_S, poll=1.0)
        with httpx.Client(timeout=60, trust_env=False) as client:
            answers = [completion(client, proxy, llama_ckpt, prompt, MAX_TOKENS) for prompt in PROMPTS]
            decode = f"http://{NODES['pdn1']}:{decode_port}"
            decode_info = client.get(f"{decode}/info").json()
            moved = kv_bytes_received(client, decode)
    finally:
        subprocess.run(["scancel", "--signal=TERM", "--batch", job], env=slurm.env, timeout=30)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while slurm.job_state(job).get("JobState") in ("RUNNING", "COMPLETING", "PENDING", "CONFIGURING"):
            if time.monotonic() > deadline:
                subprocess.run(["scancel", job], env=slurm.env, timeout=30)
                raise AssertionError(f"job {job} still running {STOP_TIMEOUT_S:.0f}s after SIGTERM:\n{output()}")
            time.sleep(0.5)

    with LLM(str(llama_ckpt), device="cpu", num_gpu_blocks=NUM_BLOCKS) as colocated:
        reference = colocated.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                                               ignore_eos=True))
    assert [a["choices"][0]["token_ids"] for a in answers] == [r.token_ids for r in reference]
    assert decode_info["role"] == "decode" and decode_info["tp_size"] == 2
    assert (tmp_path / "logs" / "node1" / "decode-0-rank1.log").exists()  # the second node ran the decode's rank 1
    assert moved > 0, "the decode instance on node 2 received no KV from node 1's prefill (it recomputed)"
    text = output()
    assert "slurm: 2 srun steps on 127.0.0.1, 127.0.0.2" in text, text
    assert "stopped: every srun step ended" in text, text
    state = slurm.job_state(job)
    assert state.get("JobState") == "COMPLETED" and state.get("ExitCode") == "0:0", f"{state}\n{text}"
    for node in (0, 1):
        node_out = (tmp_path / "logs" / f"slurm-node{node}.log").read_text(errors="replace")
        assert "stopped: all processes reaped" in node_out, node_out
        assert f"node {node}: device cpu" in node_out.splitlines(), node_out  # the nodes agree on auto
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes of the deployment left: {left}"


@pytest.mark.e2e
def test_a_nodes_failed_check_is_the_launchers_one_error_line(slurm: SlurmCluster, tmp_path: Path) -> None:
    """salloc runs the launcher where salloc runs (here, as on a login node, without a GPU): --device cuda with
    sleep mode passes its checks, since the GPUs are the nodes'; each node's step then refuses (no GPU there
    either), and the launcher repeats the step's own error as its one error line: exit 1, no traceback."""
    env = {**slurm.env, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(["salloc", "--nodes=2", sys.executable, "-m", "pdlaunch", "serve", "--model", "tiny",
                           "--backend", "slurm", "--device", "cuda", "--enable-sleep-mode", "--port", str(free_port()),
                           "--log-dir", str(tmp_path / "logs")], env=env, cwd=tmp_path, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=START_TIMEOUT_S)
    text = done.stdout + done.stderr
    assert done.returncode == 1, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    # Node 0 holds both instances: its GPUs are its step's, and too few (none) is said in SLURM's terms, with the
    # sbatch option to fix it. Node 1 holds none: `device: cuda` without a CUDA device. Either may stop first.
    said = re.match(r"error: node ([01]): (?:parallel\.nodes\[0\]: node 0 \(127\.0\.0\.1\) needs 2 GPU\(s\) for the "
                    r"ranks the deployment places there, but its srun step sees 0 \(SLURM_GPUS_ON_NODE unset, "
                    r"CUDA_VISIBLE_DEVICES unset\); allocate the GPUs with the job: sbatch/salloc --gres=gpu:2 "
                    r"|device: cuda requested but no CUDA device is visible on this machine)", errors[0])
    assert said is not None and ("parallel.nodes" in errors[0]) == (said.group(1) == "0"), text
    assert errors[0].count("no CUDA device is visible") <= 1, text  # the same fact, said once
    assert "model.enable_sleep_mode: sleep mode is not supported" in errors[0], text
    assert "enable_cumem_allocator" not in errors[0], text  # only what the user asked for is named
    assert "stopped: every srun step ended" in text and "Traceback" not in text, text
