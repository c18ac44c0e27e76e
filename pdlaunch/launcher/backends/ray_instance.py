"""TP rank 0 of an instance under `--backend ray`: a Ray actor that runs the instance's HTTP server and
engine (the `pdlaunch.server` entry point) in its own process, on the node Ray placed its bundle on. The
launcher (ray_actors.py) gives it the instance's spec with that node's address as host and side channel, and
the handles of the instance's other rank actors (distributed/ray_rank.py), which its engine drives
through Ray calls (distributed/ray_executor.py).

A plain class: ray_actors.py wraps it with ray.remote. `serve` runs in the actor's default concurrency group
until the server stops; `stop` and `node_address` run in CONTROL_GROUP beside it.
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


class RayInstance:
    """TP rank 0 of one instance: its HTTP server and engine, in this actor's process."""

    def __init__(self, name: str, log_path: str, env: dict[str, str]) -> None:
        log_to(log_path, name, env)
        self.name = name
        self._server: uvicorn.Server | None = None
        self._stop = threading.Event()
        log.info("%s: rank 0 actor on %s (pid %d)", name, node_address(), os.getpid())

    def node_address(self) -> str:
        return node_address()

    def serve(self, config_json: str, spec_json: str, ranks: list[ActorHandle]) -> int:
        """Run the instance until stop() or an engine failure; its exit code (as `python -m pdlaunch.server`)."""
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
