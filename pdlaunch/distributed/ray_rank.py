"""The Ray actors of one instance under `--backend ray` (launcher/backends/ray_actors.py makes them, one per
TP rank, each in its bundle of the instance's placement group).

- TP rank 0 (launcher/backends/ray_instance.py) runs the instance's HTTP server and engine; its engine
  drives the other ranks through Ray actor calls (ray_executor.py).
- `RayRank` is TP rank r > 0: it builds its shard as a local worker does (worker.build_worker_rank) and
  then answers rank 0's calls: `execute` a step, mirror a connector call, `shutdown`. The calls of one
  caller run in order on the actor's default concurrency group (one thread), so steps keep their order.
  `until_shutdown` (its own group) returns when the rank is shut down: rank 0's watchdog holds that
  call, and Ray fails it at once when the actor or its node dies.

These are plain classes: the launcher wraps them with ray.remote, so importing this module needs no ray.
Each actor's logs go to its own file in the deployment's log directory (on the node it runs on).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from pathlib import Path

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.config.rules.host import make_log_dir
from pdlaunch.distributed.message_stream import MalformedMessage
from pdlaunch.distributed.messages import ConnectorCall, Ready
from pdlaunch.distributed.parallel_state import destroy_tp_group
from pdlaunch.distributed.rank import RankState
from pdlaunch.distributed.tp_connector import rank_connector_call
from pdlaunch.distributed.worker import build_worker_rank
from pdlaunch.kv_transfer.base import KVConnector
from pdlaunch.runner.step_inputs import StepInputs

log = logging.getLogger(__name__)

CONTROL_GROUP = "control"  # concurrency group of the calls that must not wait behind a step or serve()
SUMMARY_CHARS = 300  # a Ray failure is named in at most this many characters
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the task name in its messages


def ray_failure(exc: BaseException) -> str:
    """What a Ray error says went wrong, in one line. Ray's own first line is a headline (`ray::X.serve()
    (pid=.., ip=.., actor_id=..)`, `The actor died because of an error raised in its creation task, ...`):
    the cause is the exception the remote code raised (a task's `cause`, or the last line of the remote
    traceback Ray quotes for a constructor), or, for an actor that died, the reason after the fields."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        if type(cause).__module__.startswith("ray."):
            return ray_failure(cause)
        text = str(cause).strip().splitlines()
        return f"{type(cause).__name__}: {text[0]}"[:SUMMARY_CHARS] if text else type(cause).__name__
    lines = [line.rstrip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if any(line.lstrip().startswith('File "') for line in lines):  # a quoted traceback: its last exception line
        last_frame = max(i for i, line in enumerate(lines) if line[:1].isspace())
        tail = lines[last_frame + 1:]
        return (tail[0] if tail else lines[-1].strip())[:SUMMARY_CHARS]
    reasons = [line for line in lines[1:] if not line[:1].isspace()]  # after the headline and its fields
    return (reasons[0] if reasons else lines[0])[:SUMMARY_CHARS]


def node_address() -> str:
    """The address of this actor's node, as Ray reports it (what it binds and advertises)."""
    import ray

    return str(ray.util.get_node_ip_address())


def log_to(path: str, label: str, env: dict[str, str]) -> None:
    """Send this actor process's output (stdout, stderr, logging) to `path`, appended, and set `env`."""
    os.environ.update(env)
    make_log_dir(Path(path).parent)
    # O_NOFOLLOW: a symlink planted in log_dir on this node does not get its target appended to (ELOOP instead)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {label} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


class RayRank:
    """TP rank `rank` > 0 of one instance."""

    def __init__(self, rank: int, config_json: str, spec_json: str, log_path: str, env: dict[str, str]) -> None:
        log_to(log_path, f"{InstanceSpec.model_validate_json(spec_json).name} rank {rank}", env)
        self.rank = rank
        self.config = DeploymentConfig.model_validate_json(config_json)
        self.spec = InstanceSpec.model_validate_json(spec_json)
        self.state: RankState | None = None
        self.connector: KVConnector | None = None
        self._down = threading.Event()
        log.info("TP rank %d of %s: actor on %s (pid %d)", rank, self.spec.name, node_address(), os.getpid())

    def node_address(self) -> str:
        return node_address()

    def setup(self, device_type: str, dtype_name: str, max_model_len: int, master_port: int) -> Ready:
        """Join rank 0's group (its store at parallel.master_addr:master_port), build the shard and connector."""
        self.state, self.connector, ready = build_worker_rank(
            self.rank, self.config, self.spec, device_type, dtype_name, max_model_len, master_port)
        log.info("TP rank %d of %s ready (engine_id %s)", self.rank, self.spec.name, ready.engine_id)
        return ready

    def execute(self, inputs: StepInputs) -> None:
        if self.state is None:
            raise RuntimeError(f"TP rank {self.rank} got a step before its setup")
        self.state.runner.run(inputs)

    def connector_call(self, call: ConnectorCall) -> object:
        problem = call.problem()
        if problem is not None:
            raise MalformedMessage("rank 0", call, problem)
        if self.connector is None:
            raise RuntimeError(f"rank 0 mirrored {type(call).__name__} but TP rank {self.rank} has no connector")
        return rank_connector_call(self.connector, self.rank, self.spec.tp, call)

    def shutdown(self) -> None:
        """Leave the group and free this rank's memory (idempotent); the launcher then removes the actor."""
        if self._down.is_set():
            return
        log.info("TP rank %d of %s shutting down", self.rank, self.spec.name)
        try:
            if self.connector is not None:
                self.connector.shutdown()
            if self.state is not None:
                self.state.runner.release()
            destroy_tp_group()
        finally:
            self._down.set()

    def until_shutdown(self) -> None:
        """Returns once the rank is shut down (run in CONTROL_GROUP; Ray fails it if the actor dies)."""
        self._down.wait()
