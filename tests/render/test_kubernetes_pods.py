"""The rendered manifests run: the containers of `pdlaunch render kubernetes` (prefill and decode leader
pods, the proxy) started here as the kubelet would start them, each "pod" on its own loopback address
($(POD_IP) expanded, the Secret's deployment.json mounted, LWS DNS names pointed at those addresses),
serve PD requests whose answers equal a colocated engine's."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from pdlaunch.cli import app
from pdlaunch.engine.llm import LLM
from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.render.objects import DEPLOYMENT_FILE
from tests.helpers.ports import free_ports
from tests.multinode.two_node_run import NUM_BLOCKS, PROMPTS, completion, kv_bytes_received
from tests.serving.helpers import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

START_TIMEOUT_S = 240.0
MAX_TOKENS = 8
POD_IPS = {"prefill": "127.0.0.1", "decode": "127.0.0.2"}


class Pods:
    """Containers started as processes; every one is stopped and reaped at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, container: dict[str, Any], env: dict[str, str]) -> None:
        assert container["command"][:2] == ["python", "-m"]
        out = open(self.tmp / f"{name}.log", "wb")
        self.procs.append((name, subprocess.Popen([sys.executable, *container["command"][1:], *container["args"]],
                                                  stdout=out, stderr=subprocess.STDOUT, env=env,
                                                  start_new_session=True)))
        out.close()

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{self.log(name)}")

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


@pytest.fixture
def pods(tmp_path: Path) -> Iterator[Pods]:
    started = Pods(tmp_path)
    try:
        yield started
    finally:
        started.stop()


def expand(value: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion in args and env values."""
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], value)


def container_env(container: dict[str, Any], pod: dict[str, str], secret: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "UCX_NET_DEVICES"}  # pods on 127.0.0.1 and 127.0.0.2
    env["OMP_NUM_THREADS"] = "1"
    for item in container.get("env", []):
        source = item.get("valueFrom", {})
        if "fieldRef" in source:
            env[item["name"]] = pod[source["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in source:
            env[item["name"]] = secret[source["secretKeyRef"]["key"]]
        else:
            env[item["name"]] = expand(item["value"], env)
    return env


def test_rendered_pods_serve_pd_like_colocated(pods: Pods, llama_ckpt: Path, tmp_path: Path) -> None:
    side, proxy_port, prefill_port, decode_port = free_ports(4)
    config = tmp_path / "pd.yaml"
    config.write_text(f"""\
device: cpu
model: {{path: "{llama_ckpt}"}}
cache: {{num_gpu_blocks: {NUM_BLOCKS}}}
kv_transfer: {{side_channel_port: {side}}}
proxy: {{port: {proxy_port}, health_timeout_seconds: 2}}
supervision: {{stall_restart_seconds: 30}}
instances:
  - {{role: prefill, count: 1, base_port: {prefill_port}}}
  - {{role: decode, count: 1, base_port: {decode_port}}}
""")
    out = tmp_path / "manifests"
    # The checkpoint "on the node" (hostpath), at model.path in the pods as here: mounted at its directory.
    result = CliRunner().invoke(app, ["render", "kubernetes", str(config), "--out", str(out), "--image", "x",
                                      "--model-volume", f"hostpath:{llama_ckpt.parent}"])
    assert result.exit_code == 0, result.output
    manifests = [yaml.safe_load(p.read_text()) for p in sorted(out.glob("*.yaml"))]
    secret = next(m for m in manifests if m["kind"] == "Secret")["stringData"]
    deployment = tmp_path / "deployment.json"  # the Secret's volume
    deployment.write_text(secret["deployment.json"])

    hosts: dict[str, str] = {}  # LWS leader DNS name -> its "pod" address
    liveness: dict[str, tuple[list[str], dict[str, str]]] = {}  # role -> its leader's probe command, its env
    for lws in (m for m in manifests if m["kind"] == "LeaderWorkerSet"):
        role = lws["metadata"]["labels"]["pdlaunch.io/role"]
        name = lws["metadata"]["name"]
        hosts[f"{name}-0.{name}"] = POD_IPS[role]
        container = lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]
        assert {"name": "model", "mountPath": str(llama_ckpt.parent), "readOnly": True} in container["volumeMounts"]
        pod = {"status.podIP": POD_IPS[role], "metadata.name": f"{name}-0", "metadata.uid": f"uid-{role}"}
        env = container_env(container, pod, secret)
        container = {**container, "args": [expand(a, env).replace(DEPLOYMENT_FILE, str(deployment))
                                           for a in container["args"]]}
        pods.start(role, container, env)
        liveness[role] = ([sys.executable, *container["livenessProbe"]["exec"]["command"][1:]], env)
    proxy_deployment = next(m for m in manifests if m["kind"] == "Deployment")
    proxy = proxy_deployment["spec"]["template"]["spec"]["containers"][0]
    args = []
    for arg in proxy["args"]:
        for dns, address in hosts.items():
            arg = arg.replace(f"//{dns}:", f"//{address}:")
        args.append(arg)
    pods.start("proxy", {**proxy, "args": args}, container_env(proxy, {}, secret))
    port = proxy["ports"][0]["containerPort"]
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        pods.check_alive()
        try:
            return httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, "the rendered proxy to see the rendered prefill and decode pods ready", START_TIMEOUT_S, poll=0.5)
    with httpx.Client(timeout=60, trust_env=False) as client:
        answers = [completion(client, url, llama_ckpt, prompt, MAX_TOKENS) for prompt in PROMPTS]
        decode_port = next(m for m in manifests if m["kind"] == "Service" and m["metadata"]["name"] ==
                           "pdlaunch-decode")["spec"]["ports"][0]["port"]
        decode = f"http://{POD_IPS['decode']}:{decode_port}"
        info = client.get(f"{decode}/info").json()
        moved = kv_bytes_received(client, decode)
    with LLM(str(llama_ckpt), device="cpu", num_gpu_blocks=NUM_BLOCKS) as colocated:
        reference = colocated.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                                               ignore_eos=True))
    assert [a["choices"][0]["token_ids"] for a in answers] == [r.token_ids for r in reference]
    assert moved > 0, "the decode pod received no KV from the prefill pod (it recomputed)"
    assert info["engine_id"].endswith("-pdlaunch-decode-1-0-uid-decode")
    assert info["name"] == "pdlaunch-decode-1-0"  # its pod's, as `kubectl get pods` lists it
    # supervision.stall_restart_seconds: the leaders' livenessProbe passes while they answer /health, and fails on
    # a stalled one (stopped: alive, its port accepting, no answer), which the kubelet would restart
    for role, (command, env) in liveness.items():
        assert subprocess.run(command, env=env, capture_output=True, timeout=30, check=False).returncode == 0, role
    decode_proc = next(proc for name, proc in pods.procs if name == "decode")
    os.killpg(decode_proc.pid, signal.SIGSTOP)
    try:
        stalled = subprocess.run(liveness["decode"][0], env=liveness["decode"][1], capture_output=True, text=True,
                                 timeout=30, check=False)
    finally:
        os.killpg(decode_proc.pid, signal.SIGCONT)
    assert stalled.returncode != 0 and "timed out" in stalled.stderr, stalled
