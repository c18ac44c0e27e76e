"""One instance process: `python -m pdlaunch.server --deployment FILE.json --instance SPEC_JSON`.

The launcher writes the validated DeploymentConfig to FILE.json and passes this instance's
InstanceSpec as JSON; its environment names the flags the user typed (config/flag_terms.py), which an engine
start-up error is written in. Exit code 0 on a requested shutdown, 1 when the engine failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn
from starlette.types import ASGIApp

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec, instance_spec_from_json
from pdlaunch.config.flag_terms import flag_names_from_env, name_error
from pdlaunch.config.gil_switch import gil_switch_seconds
from pdlaunch.errors import ArgumentParser, PdlaunchError, argument_type
from pdlaunch.http.draining_server import DrainingServer
from pdlaunch.http.header_timeout import HeaderTimeoutProtocol
from pdlaunch.http.shutdown_answer import stop_before_deadline
from pdlaunch.server.app import build_app
from pdlaunch.server.engine_loop import EngineLoop
from pdlaunch.server.watchdog import watch_parent

if TYPE_CHECKING:
    from pdlaunch.engine.llm_engine import LLMEngine

GRACEFUL_SHUTDOWN_S = 3  # the proxy drained in-flight requests before instances are stopped
# An idle client connection is closed after this long (uvicorn's default is 5 s): well past the proxy's
# pool expiry (proxy/app.py), so the proxy never sends a leg on a connection this server is closing.
KEEP_ALIVE_S = 30

log = logging.getLogger("pdlaunch.server")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m pdlaunch.server", description=__doc__)
    parser.add_argument("--deployment", required=True, type=Path, help="DeploymentConfig as JSON.")
    parser.add_argument("--instance", required=True, type=argument_type(instance_spec_from_json),
                        help="InstanceSpec as JSON.")
    parser.add_argument("--parent-pid", type=int, default=None, help="Exit when this process is gone.")
    return parser.parse_args(argv)


MIN_PENDING_REQUESTS = 256
PENDING_PER_SEQ = 8  # a few batches' worth


def max_pending_requests(config: DeploymentConfig) -> int:
    """Requests an instance queues before answering 503: a few batches' worth."""
    return max(MIN_PENDING_REQUESTS, PENDING_PER_SEQ * config.scheduler.max_num_seqs)


def pending_limit_source(config: DeploymentConfig) -> str:
    """What sets max_pending_requests, as the 503 past it says: the setting to raise, as a user writes it. Where the
    floor sets the limit, raising max_num_seqs helps only past floor / PENDING_PER_SEQ: the message says so."""
    seqs = config.scheduler.max_num_seqs
    floor = MIN_PENDING_REQUESTS // PENDING_PER_SEQ  # 32: up to it, the floor is the limit
    how_far = f" above {floor}" if seqs <= floor else ""
    return (f"{PENDING_PER_SEQ} x scheduler.max_num_seqs ({seqs}), at least {MIN_PENDING_REQUESTS}: raise "
            f"`max_num_seqs`{how_far} under `scheduler:` in the config YAML or `--max-num-seqs` of `pdlaunch serve` "
            "(it also lets a batch grow), or add instances of this role")


def server_config(app: ASGIApp, host: str, port: int) -> uvicorn.Config:
    """How an instance serves its app: h11 with a bound on the wait for a request's headers
    (http/header_timeout.py), which uvicorn's own protocols lack."""
    return uvicorn.Config(
        app, host=host, port=port, log_level="info", access_log=False, http=HeaderTimeoutProtocol,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, timeout_keep_alive=KEEP_ALIVE_S, lifespan="on",
    )


def main(argv: list[str] | None = None, on_server: Callable[[uvicorn.Server], None] | None = None) -> int:
    """`on_server` receives the server before it runs (a Ray rank-0 actor stops it through should_exit)."""
    sys.setswitchinterval(gil_switch_seconds(os.environ))  # the engine thread and the event loop: config/gil_switch.py
    args = parse_args(argv)
    config = DeploymentConfig.model_validate_json(args.deployment.read_text())
    spec: InstanceSpec = args.instance
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {spec.name} %(name)s: %(message)s")
    log.info("starting %s on %s:%d (engine_id %s, device %s %s)",
             spec.name, spec.host, spec.port, spec.engine_id, spec.device, spec.devices)
    try:
        flags = flag_names_from_env(os.environ)
    except PdlaunchError as exc:
        log.error("exiting: %s", exc.render())
        return 1

    server: uvicorn.Server | None = None
    failure: list[str] = []

    def on_fatal(message: str) -> None:
        failure.append(message)
        if server is not None:
            server.should_exit = True

    def build_engine() -> LLMEngine:
        from pdlaunch.engine.llm_engine import LLMEngine

        try:
            return LLMEngine(config, spec)
        except PdlaunchError as exc:  # says `--num-gpu-blocks` to a user who typed that, not `cache.num_gpu_blocks`
            name_error(exc, flags)
            raise

    engine_loop = EngineLoop(build_engine, max_pending_requests=max_pending_requests(config), on_fatal=on_fatal,
                             pending_limit_source=pending_limit_source(config))
    app = build_app(engine_loop, config, spec)
    # What still runs shortly before the drain's end is answered 503 shutting_down (http/shutdown_answer.py).
    server = DrainingServer(server_config(app, spec.host, spec.port),
                            on_shutdown=lambda: stop_before_deadline(app.state.stopping, GRACEFUL_SHUTDOWN_S))
    if on_server is not None:
        on_server(server)
    if args.parent_pid is not None:
        watch_parent(args.parent_pid, lambda: setattr(server, "should_exit", True))
    try:
        server.run()
    except SystemExit as exc:  # uvicorn could not start (3: the port is taken); the engine is already stopped
        return exc.code if isinstance(exc.code, int) else 1
    if failure:
        log.error("exiting: %s", failure[0])
        return 1
    return 0


def exit_now(code: int) -> None:
    """End the process with `code` once logs are flushed, skipping interpreter finalization and native
    library destructors: the engine thread has stopped and released its KV by then, and the UCX copy
    bundled with nixl_cu13 can crash in its libnl-route destructor at exit (a signal 11 instead of
    the exit code, which the launcher would report to the user as a crash)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
