"""`pdlaunch serve --backend ray` of a 1P1D tiny deployment (TP 1, CPU, NIXL) on a test Ray head, as a context
manager: the launcher process, its output, and a poll for a line of it. The process is killed and reaped on exit if
the test has not ended it."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.cluster.ray_cluster import RayCluster
from tests.helpers.ports import free_ports
from tests.multinode.two_node_run import NUM_BLOCKS


@dataclass
class RayServe:
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    logs: Path
    proxy_port: int

    def output(self) -> str:
        """stdout, then stderr, as written so far."""
        return f"{self.out.read_text(errors='replace')}\n{self.err.read_text(errors='replace')}"

    def said(self, text: str) -> bool:
        """Whether the launcher has written `text`; fails the test when it exited without writing it."""
        output = self.output()
        assert self.proc.poll() is None or text in output, \
            f"pdlaunch serve exited with {self.proc.returncode} before saying {text!r}:\n{output}"
        return text in output


@contextmanager
def ray_serve(head: RayCluster, checkpoint: Path, tmp_path: Path, node_resource: str) -> Iterator[RayServe]:
    """The deployment's prefill and decode each take one `node_resource` of the head (the head's own resource: the
    test's cluster, not another's)."""
    proxy_port, prefill_port, decode_port = free_ports(3)
    logs = tmp_path / "logs"
    config = tmp_path / "pd.yaml"
    config.write_text(f"""\
launcher:
  backend: ray
  ray_resources: {{prefill: {{{node_resource}: 1}}, decode: {{{node_resource}: 1}}}}
device: cpu
model: {{path: "{checkpoint}"}}
cache: {{num_gpu_blocks: {NUM_BLOCKS}}}
kv_transfer: {{connector: nixl, engine_id: {uuid.uuid4().hex}}}
proxy: {{host: 127.0.0.1, port: {proxy_port}}}
log_dir: {logs}
instances:
  - {{role: prefill, count: 1, tp: 1, base_port: {prefill_port}}}
  - {{role: decode, count: 1, tp: 1, base_port: {decode_port}}}
""")
    env = {k: v for k, v in head.env.items() if k != "UCX_NET_DEVICES"}
    env["OMP_NUM_THREADS"] = "1"
    out, err = tmp_path / "serve.out", tmp_path / "serve.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "pdlaunch", "serve", str(config), "--backend", "ray",
                                 "--ray-address", head.address], stdout=stdout, stderr=stderr,
                                stdin=subprocess.DEVNULL, env=env)
    try:
        yield RayServe(proc, out, err, logs, proxy_port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
