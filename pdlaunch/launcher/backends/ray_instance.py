"""TP rank 0 of an instance under `--backend ray`: a Ray actor that runs the instance's HTTP server and
engine (the `pdlaunch.server` entry point) in its own process, on the node Ray placed its bundle on. The
launcher (ray_actors.py) gives it the instance's spec with that node's address as host and side channel, and
the handles of the instance's other rank actors (distributed/ray_rank.py), which its engine drives
through Ray calls (distributed/ray_executor.py).

A plain class: ray_actors.py wraps it with ray.remote. `serve` runs in the actor's default concurrency group
until the server stops; `stop` and `node_address` run in CONTROL_GROUP beside it, and `served` in the watch group
(ray_actors.WATCH): the launcher's handle on the instance's end once Ray failed its `serve` call while the actor was
unreachable, and the actor answered again (ray_unreachable.py).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from typing import TYPE_CHECKING

import uvicorn

from pdlaunch.distributed.ray_rank import log_to, node_address

if TYPE_CHECKING:
    from ray.actor import ActorHandle

log = logging.getLogger(__name__)

# `served` is called once the actor answered again after its `serve` call was lost: serve began long before, or
# (its call lost on the way) never will
SERVE_BEGIN_WAIT_S = 10.0


class ServeOutcome:
    """What the actor's `serve` returned or raised, for a `served` call made while or after it ran."""

    def __init__(self) -> None:
        self._began = threading.Event()
        self._ended = threading.Event()
        self._outcome: int | BaseException = 0

    def begin(self) -> None:
        self._began.set()

    def end(self, outcome: int | BaseException) -> None:
        self._outcome = outcome
        self._ended.set()

    def wait(self, began_within_s: float = SERVE_BEGIN_WAIT_S) -> int:
        """Once serve has ended: what it returned (what it raised is raised). RuntimeError when it has not begun
        within `began_within_s`: its call never reached this actor."""
        if not self._began.wait(began_within_s):
            raise RuntimeError(f"its serve call never began on its actor within {began_within_s:g}s (Ray lost it on "
                               "the way)")
        self._ended.wait()
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        return self._outcome


class RayInstance:
    """TP rank 0 of one instance: its HTTP server and engine, in this actor's process."""

    def __init__(self, name: str, log_path: str, env: dict[str, str]) -> None:
        log_to(log_path, name, env)
        self.name = name
        self._server: uvicorn.Server | None = None
        self._stop = threading.Event()
        self._outcome = ServeOutcome()
        log.info("%s: rank 0 actor on %s (pid %d)", name, node_address(), os.getpid())

    def node_address(self) -> str:
        return node_address()

    def serve(self, config_json: str, spec_json: str, ranks: list[ActorHandle]) -> int:
        """Run the instance until stop() or an engine failure; its exit code (as `python -m pdlaunch.server`)."""
        self._outcome.begin()
        try:
            code = self._serve(config_json, spec_json, ranks)
        except BaseException as exc:
            self._outcome.end(exc)
            raise
        self._outcome.end(code)
        return code

    def served(self) -> int:
        """What `serve` returns (raises what it raised), once it has; run in the watch group."""
        return self._outcome.wait()

    def _serve(self, config_json: str, spec_json: str, ranks: list[ActorHandle]) -> int:
        from pdlaunch.distributed import ray_executor
        from pdlaunch.server.__main__ import main

        ray_executor.use_rank_actors(ranks)
        fd, path = tempfile.mkstemp(prefix="pdlaunch-ray-", suffix=".json")  # mode 0600: it holds the secret
        with os.fdopen(fd, "w") as f:
            f.write(config_json)
        try:
            return main(["--deployment", path, "--instance", spec_json], on_server=self._started)
        finally:
            os.unlink(path)

    def _started(self, server: uvicorn.Server) -> None:
        self._server = server
        if self._stop.is_set():
            server.should_exit = True

    def stop(self) -> None:
        """Ask the server to stop (it drains, then the engine shuts its ranks down); run in CONTROL_GROUP."""
        self._stop.set()
        if self._server is not None:
            self._server.should_exit = True
