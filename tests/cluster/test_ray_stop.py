"""How `pdlaunch serve --backend ray` stops, on a real Ray cluster of three raylets on this machine
(tests/cluster/ray_cluster.py): a second Ctrl-C cuts the stop short, and a launcher killed outright
(SIGKILL) leaves nothing on the cluster.

The drain is held open for as long as the test wants: the decode's rank-0 actor process is frozen
(SIGSTOP), so a stream in flight through the proxy never finishes and the decode never stops by
itself; the launcher runs with its drain and stop deadlines raised to an hour (drain_timeout_seconds and
the LONG shim). A
launcher that exits within the test's generous timeouts therefore did not wait for either deadline.

- a second SIGINT while the proxy drains that stream: "second signal: stopping now", once; the proxy
  is killed (the stream is cut: no [DONE], no end-of-drain event, far fewer tokens than asked for),
  every actor is killed (the frozen one too), every placement group removed, exit 0;
- a second SIGINT while the launcher waits for the instances to stop: the same;
- SIGKILL of a serving launcher: Ray ends the actors and placement groups the dead driver owned (none
  is detached), and the proxy (its child) exits when it sees its launcher gone.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cluster.ray_cluster import HEAD_RESOURCE, RayCluster, running_ray
from tests.helpers.pids import pid_alive, signal_pid
from tests.helpers.ports import free_ports
from tests.multinode.two_node_run import NUM_BLOCKS, PROMPTS
from tests.serving.helpers import wait_for

ray = pytest.importorskip("ray", reason="--backend ray needs the ray package (pip install 'pdlaunch[ray]')")

START_TIMEOUT_S = 300.0  # Ray actors importing torch and building engines on a loaded 2-core machine
EXIT_TIMEOUT_S = 120.0  # far below the hour the LONG launcher would wait for its drain or its instances
MAX_TOKENS = 400
# `pdlaunch serve` with the instances' stop given an hour, not seconds (the proxy's drain: the config's
# supervision.drain_timeout_seconds, an hour too in long_launcher).
LONG = ("import sys\n"
        "from pdlaunch.launcher.backends import ray_actors\n"
        "ray_actors.STOP_TIMEOUT_S = 3600.0\n"
        "from pdlaunch.cli import main\n"
        "main()\n")


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    yield from running_ray()


class Launcher:
    """`pdlaunch serve CONFIG` on the Ray backend (through `argv_head`), output in a file; `supervision`: the
    config's supervision section, as YAML flow mapping."""

    def __init__(self, cluster: RayCluster, ckpt: Path, tmp: Path, argv_head: list[str],
                 supervision: str = "{}") -> None:
        self.cluster, self.ckpt, self.logs = cluster, ckpt, tmp / "logs"
        self.proxy_port, prefill_port, decode_port = free_ports(3)
        self.proxy = f"http://127.0.0.1:{self.proxy_port}"
        self.engine_id = uuid.uuid4().hex
        self.prefix = f"pdlaunch-{self.engine_id[:8]}-"  # of its actors' and placement groups' names
        config = tmp / "pd.yaml"
        config.write_text(f"""\
launcher:
  backend: ray
  ray_address: "{cluster.address}"
  ray_resources: {{prefill: {{{HEAD_RESOURCE}: 1}}, decode: {{pd_decode: 0.01}}}}
device: cpu
model: {{path: "{ckpt}"}}
cache: {{num_gpu_blocks: {NUM_BLOCKS}}}
kv_transfer: {{connector: nixl, engine_id: {self.engine_id}}}
# a stream whose decode is frozen stays open (no migration, no request deadline) until the drain ends
proxy: {{host: 127.0.0.1, port: {self.proxy_port}, migration_limit: 0, request_timeout_seconds: 3600}}
supervision: {supervision}
log_dir: {self.logs}
instances:
  - {{role: prefill, count: 1, tp: 1, base_port: {prefill_port}}}
  - {{role: decode, count: 1, tp: 2, base_port: {decode_port}}}
""")
        self.out = tmp / "serve.out"
        self._file = open(self.out, "wb")
        env = {k: v for k, v in cluster.env.items() if k != "UCX_NET_DEVICES"}
        env["OMP_NUM_THREADS"] = "1"
        self.proc = subprocess.Popen([*argv_head, "serve", str(config)], stdout=self._file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)

    @property
    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def said(self, text: str) -> bool:
        assert self.proc.poll() is None or text in self.output, \
            f"pdlaunch serve exited with {self.proc.returncode} before saying {text!r}:\n{self.output}"
        return text in self.output

    def wait_ready(self) -> None:
        wait_for(lambda: self.said("ready: OpenAI API at"), "the ray deployment to be ready", START_TIMEOUT_S, poll=1.0)

    def decode_rank0_pid(self) -> int:
        """The decode's RayInstance actor process, as its log names it."""
        found = re.search(r"decode-0: rank 0 actor on \S+ \(pid (\d+)\)",
                          (self.logs / "decode-0.log").read_text(errors="replace"))
        assert found, (self.logs / "decode-0.log").read_text(errors="replace")
        return int(found.group(1))

    def left_on_cluster(self) -> dict[str, list[str]]:
        """Its placement groups not removed and its named actors still alive, as the GCS has them."""
        out = self.cluster.query(
            "from ray.util import placement_group_table\n"
            f"prefix = {self.prefix!r}\n"
            "out = {'groups': sorted(g['name'] for g in placement_group_table().values() "
            "if g['state'] != 'REMOVED' and g['name'].startswith(prefix)), "
            "'actors': sorted(a['name'] for a in ray.util.list_named_actors(all_namespaces=True) "
            "if a['name'].startswith(prefix))}")
        assert isinstance(out, dict)
        return out

    def assert_nothing_left(self) -> None:
        wait_for(lambda: self.left_on_cluster() == {"groups": [], "actors": []},
                 f"no placement group or actor named {self.prefix}* on the cluster", EXIT_TIMEOUT_S, poll=1.0)
        wait_for(lambda: not self.cluster.processes("ray::RayInstance") and not self.cluster.processes("ray::RayRank"),
                 "the deployment's actor processes to exit", EXIT_TIMEOUT_S, poll=0.5)
        wait_for(lambda: not self.cluster.processes(f"--port {self.proxy_port} "),
                 "the deployment's proxy to exit", EXIT_TIMEOUT_S, poll=0.5)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._file.close()


class Stream:
    """A streamed completion through the proxy, read by a thread: its events, and how it ended."""

    def __init__(self, launcher: Launcher) -> None:
        self.events: list[str] = []
        self.ended: str | None = None  # "[DONE]", "closed" (the body ended short), or the error raised
        self.first = threading.Event()
        body = {"model": str(launcher.ckpt), "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True, "stream": True}
        self._thread = threading.Thread(target=self._read, args=(f"{launcher.proxy}/v1/completions", body),
                                        daemon=True)
        self._thread.start()

    def _read(self, url: str, body: dict[str, object]) -> None:
        try:
            with httpx.stream("POST", url, json=body, timeout=httpx.Timeout(EXIT_TIMEOUT_S * 4), trust_env=False) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
                        self.first.set()
            self.ended = "[DONE]" if self.events and self.events[-1] == "[DONE]" else "closed"
        except httpx.HTTPError as exc:
            self.ended = f"{type(exc).__name__}: {exc}"
        finally:
            self.first.set()

    @property
    def tokens(self) -> int:
        return sum(1 for e in self.events if e.startswith("{") and "choices" in json.loads(e))

    def done(self) -> bool:
        return self.ended is not None


def _frozen_decode(launcher: Launcher) -> int:
    pid = launcher.decode_rank0_pid()
    signal_pid(pid, signal.SIGSTOP)
    return pid


@pytest.fixture
def long_launcher(cluster: RayCluster, llama_ckpt: Path, tmp_path: Path) -> Iterator[Launcher]:
    launcher = Launcher(cluster, llama_ckpt, tmp_path, [sys.executable, "-c", LONG],
                        supervision="{drain_timeout_seconds: 3600}")
    try:
        launcher.wait_ready()
        yield launcher
    finally:
        launcher.close()


@pytest.mark.e2e
@pytest.mark.timeout(600)
@pytest.mark.parametrize("second_signal_while", ["the proxy drains", "the instances stop"])
def test_a_second_ctrl_c_stops_at_once(long_launcher: Launcher, second_signal_while: str) -> None:
    launcher = long_launcher
    stream = None
    if second_signal_while == "the proxy drains":
        stream = Stream(launcher)
        assert stream.first.wait(START_TIMEOUT_S) and stream.events, f"no streamed token: {stream.ended}"
    frozen = _frozen_decode(launcher)

    launcher.proc.send_signal(signal.SIGINT)
    if stream is not None:
        wait_for(lambda: launcher.said("SIGINT received: draining"), "the first Ctrl-C to be heard", EXIT_TIMEOUT_S)
        assert not stream.done(), f"the stream ended before the second Ctrl-C: {stream.ended}"
    else:
        wait_for(lambda: launcher.said("instance(s) to stop"), "the launcher to wait for its instances",
                 EXIT_TIMEOUT_S)
    launcher.proc.send_signal(signal.SIGINT)

    try:
        code = launcher.proc.wait(EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the launcher still waits {EXIT_TIMEOUT_S:.0f}s after the second Ctrl-C:\n{launcher.output}")
    text = launcher.output
    assert code == 0, text
    assert text.count("second signal: stopping now") == 1, text
    assert "stopped: every actor and placement group removed" in text and "Traceback" not in text, text
    launcher.assert_nothing_left()
    assert not pid_alive(frozen), "the frozen decode actor was left running"
    if stream is not None:  # cut with the proxy, long before the drain's end or the request's
        wait_for(stream.done, "the stream to end with the proxy", EXIT_TIMEOUT_S)
        assert stream.ended != "[DONE]" and stream.tokens < MAX_TOKENS // 2, (stream.ended, stream.events[-3:])
        assert not any("shutting_down" in e for e in stream.events), stream.events[-3:]


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_killed_launcher_leaves_nothing_on_the_cluster(cluster: RayCluster, llama_ckpt: Path,
                                                         tmp_path: Path) -> None:
    launcher = Launcher(cluster, llama_ckpt, tmp_path, [sys.executable, "-m", "pdlaunch"])
    try:
        launcher.wait_ready()
        serving = launcher.left_on_cluster()
        assert len(serving["groups"]) == 2 and len(serving["actors"]) == 3, serving  # prefill; decode's 2 ranks
        launcher.proc.kill()
        launcher.proc.wait()
        launcher.assert_nothing_left()
    finally:
        launcher.close()
