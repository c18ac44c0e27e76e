"""The PD proxy process.

    python -m pdlaunch.proxy --port 8000 --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200
    python -m pdlaunch.proxy --port 8000 --colocated http://127.0.0.1:8100

Instances may be named as NAME=URL (the launcher does: prefill-0=http://...); repeat a flag for more.
It also drives vLLM-style instances that speak the same kv_transfer_params. A 200 /health that names
another role than the instance's, or (with --engine-id NAME=ID) another engine_id than ID or ID-rN, is
another server's: the instance is unhealthy until its own answers. A * in ID stands for the part the
instance's start fills in (one or more characters): `--engine-id prefill-0=BASE-POD-*` for a Kubernetes pod
named POD whatever its UID, `--engine-id prefill-1=*-prefill-1` for another node's instance whose base
engine_id that node's launcher draws.

Secrets come from the environment, never argv (visible in `ps`): PDLAUNCH_API_KEY (clients must send
`Authorization: Bearer KEY`) and PDLAUNCH_DEPLOYMENT_SECRET (the proxy's calls to instances carry
the internal token derived from it; see pdlaunch/http/auth.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import stat
import sys
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

from pdlaunch.config.launcher_config import SecurityConfig
from pdlaunch.config.log_level import LOG_LEVEL_ENV, LOG_LEVELS
from pdlaunch.config.proxy_workers import MAX_WORKERS, auto_workers
from pdlaunch.config.rules.chat_template import chat_template_problems
from pdlaunch.errors import ArgumentParser, PdlaunchError
from pdlaunch.http.draining_server import DrainingServer
from pdlaunch.http.header_timeout import HeaderTimeoutProtocol
from pdlaunch.memory.heap import freeze_startup_heap
from pdlaunch.model.demo import resolve_model_path
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.disaggregate import Disaggregation
from pdlaunch.proxy.instance_flags import check_engine_ids, check_names, parse_instances
from pdlaunch.proxy.instances import HEALTH_TIMEOUT_S, POLICIES, RESTART_BACKOFF_S, Instance, InstancePool
from pdlaunch.proxy.load_board import BoardMismatch, LoadBoard
from pdlaunch.proxy.migrate import DEFAULT_MIGRATION_LIMIT
from pdlaunch.proxy.workers import Supervisor
from pdlaunch.server.watchdog import watch_parent

DEFAULT_DRAIN_S = 5.0
API_KEY_ENV = "PDLAUNCH_API_KEY"
SECRET_ENV = "PDLAUNCH_DEPLOYMENT_SECRET"


def _env_log_level() -> str:
    """PDLAUNCH_LOG_LEVEL's level, else info (serve and check-config warn about a value that is none)."""
    level = os.environ.get(LOG_LEVEL_ENV, "info").lower()
    return level if level in LOG_LEVELS else "info"


def quiet_http_client_logs() -> None:
    """httpx logs every call at INFO: the health checks alone wrote two lines a second (2,194 of
    2,532 lines of one proxy log). At DEBUG too: there httpcore adds ~10 lines a call, and a debug proxy's
    log held 8,631 lines for 249 requests, its one line per request (X-Request-Id, instances, outcome)
    buried in them. Their warnings still show."""
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m pdlaunch.proxy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--prefill", action="append", default=[], help="Prefill instance URL (repeatable).")
    parser.add_argument("--decode", action="append", default=[], help="Decode instance URL (repeatable).")
    parser.add_argument("--colocated", action="append", default=[], help="Colocated instance URL.")
    parser.add_argument("--engine-id", action="append", default=[], metavar="NAME=ENGINE_ID",
                        help="The engine_id planned for the instance NAME (repeatable; the launcher passes each one "
                        "it knows): a /health that names another one than it or it-rN (after a restart) is "
                        "another server's, and the instance gets no requests. A * in it stands for one or more "
                        "characters the instance's start fills in (a Kubernetes pod's UID).")
    parser.add_argument("--routing-policy", choices=sorted(POLICIES), default="round_robin",
                        help="round_robin, least_loaded, or prefix: the instance that caches the longest prefix of "
                        "the prompt, weighed against its queue (needs --tokenizer; the instances' KV cache events); "
                        "proxy.routing_policy.")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="Whole-request timeout, seconds.")
    parser.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_S,
                        help="On SIGTERM, wait this long for in-flight requests.")
    parser.add_argument("--parent-pid", type=int, default=None, help="Exit when this process is gone.")
    parser.add_argument("--workers", default="1", metavar="auto|N",
                        help="Proxy processes sharing the port (each a whole proxy; load counts shared, counters "
                        "summed in /metrics): 1 to 64, or auto: one per 8 CPUs this process may use "
                        "(affinity and cgroup CPU limit), 1 to 4; proxy.workers (whose default is auto).")
    parser.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)  # a worker's socket
    parser.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--load-board", type=Path, default=None, help=argparse.SUPPRESS)  # load_board.py
    parser.add_argument("--tmp-dir", type=Path, default=None, help=argparse.SUPPRESS)  # the launcher's (workers.py)
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=_env_log_level(),
                        help=f"debug adds one line per request (its X-Request-Id, instances, outcome, time); "
                        f"default from {LOG_LEVEL_ENV}, else info.")
    parser.add_argument("--access-log", action="store_true", help="One line per HTTP request (uvicorn's).")
    parser.add_argument("--health-timeout", type=float, default=HEALTH_TIMEOUT_S,
                        help="An instance whose /health does not answer within this is stalled; "
                        "proxy.health_timeout_seconds.")
    parser.add_argument("--restart-backoff", type=float, default=RESTART_BACKOFF_S,
                        help="The launcher's wait before it restarts a dead instance, seconds; the 503 no_instance's "
                        "Retry-After counts on it until the proxy has seen an instance restart; "
                        "supervision.restart_backoff_seconds.")
    parser.add_argument("--prefill-timeout", type=float, default=None,
                        help="Deadline of the prefill leg, seconds; default derived from the prompt's length and "
                        "the measured prefill speed; proxy.prefill_timeout_seconds.")
    parser.add_argument("--load-failure-policy", choices=["recompute", "fail"], default="recompute",
                        help="When no prefill answers in time: the decode computes the prompt, or a 504; "
                        "kv_transfer.load_failure_policy.")
    parser.add_argument("--migration-limit", type=int, default=DEFAULT_MIGRATION_LIMIT,
                        help="Moves of one request to another decode when its decode dies or stalls mid-request "
                        "(0: off); proxy.migration_limit.")
    parser.add_argument("--disaggregate-min-tokens", type=int, default=None,
                        help="A prompt of fewer tokens runs on a decode alone (no prefill leg, no KV transfer); "
                        "needs --tokenizer; proxy.disaggregate_min_tokens.")
    parser.add_argument("--disaggregate-max-queue-tokens", type=int, default=None,
                        help="While every prefill has this many prompt tokens queued, a prompt that would go PD runs "
                        "on its decode alone (at most this many such tokens in flight per decode; with "
                        "--disaggregate-max-itl-ms the prompt's own tokens included); needs "
                        "--disaggregate-min-tokens; proxy.disaggregate_max_queue_tokens.")
    parser.add_argument("--disaggregate-max-itl-ms", type=float, default=None,
                        help="A prompt that would run on its decode alone goes PD while that decode's streams wait "
                        "this many ms or more per token (its /health itl_ms); needs --disaggregate-min-tokens; "
                        "proxy.disaggregate_max_itl_ms.")
    parser.add_argument("--tokenizer", default=None,
                        help="The model (checkpoint directory, FILE.gguf, demo or tiny, as --model) whose "
                        "tokenizer counts and hashes prompt tokens (the launcher passes the model's).")
    parser.add_argument("--chat-template", default=None,
                        help="The deployment's chat template (a file or the template text; model.chat_template), "
                        "applied to chat prompts before their tokens are counted and hashes; needs --tokenizer.")
    parser.add_argument("--max-request-bytes", type=int, default=SecurityConfig().max_request_bytes,
                        help="Largest request body accepted (413 above); security.max_request_bytes.")
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return args


def proxy_server_config(app: ASGIApp, host: str, port: int, access_log: bool, drain_s: int) -> uvicorn.Config:
    """How the proxy (each of its workers) serves: h11 with a bound on the wait for a request's headers
    (http/header_timeout.py), as an instance serves."""
    return uvicorn.Config(app, host=host, port=port, log_level="info", access_log=access_log,
                          http=HeaderTimeoutProtocol, timeout_graceful_shutdown=drain_s, lifespan="on")


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every flag's range and the combinations the proxy needs (parser.error: exit 2 naming the flag)."""
    if args.max_request_bytes <= 0:
        parser.error("--max-request-bytes must be positive")
    for name in ("request_timeout", "health_timeout", "prefill_timeout", "restart_backoff"):
        value = getattr(args, name)
        if value is not None and not 0 < value < float("inf"):  # nan too
            parser.error(f"--{name.replace('_', '-')} must be a positive number of seconds")
    if not 0 <= args.drain_timeout < float("inf"):
        parser.error("--drain-timeout must be 0 or more seconds")
    _check_disaggregation(parser, args)
    if args.disaggregate_min_tokens is not None and args.tokenizer is None:
        parser.error("--disaggregate-min-tokens counts prompt tokens with the model's tokenizer: give --tokenizer DIR")
    if args.routing_policy == "prefix" and args.tokenizer is None:
        parser.error("--routing-policy prefix hashes the prompt's token ids, tokenized with the model's tokenizer: "
                     "give --tokenizer DIR")
    if args.tokenizer is not None:
        try:
            args.tokenizer = resolve_model_path(args.tokenizer)
        except PdlaunchError as exc:
            parser.error(f"--tokenizer: {exc.render()}")
    if args.chat_template is not None:
        if args.tokenizer is None:
            parser.error("--chat-template applies to the prompts the model's tokenizer counts: give --tokenizer DIR")
        for _, message in chat_template_problems(args.chat_template):
            parser.error(f"--chat-template: {message}")
    if args.migration_limit < 0:
        parser.error("--migration-limit must be 0 or more")
    workers = args.workers.strip()
    if workers != "auto" and not (workers.isascii() and workers.isdigit() and 1 <= int(workers) <= MAX_WORKERS):
        parser.error(f"--workers must be 1 to {MAX_WORKERS}, or auto (got {args.workers!r})")
    args.workers = workers if workers == "auto" else int(workers)
    if args.listen_fd is not None:  # internal: the supervisor's listening socket (workers.py)
        try:
            kind = os.fstat(args.listen_fd).st_mode
        except OSError:
            kind = 0
        if not stat.S_ISSOCK(kind):
            parser.error(f"--listen-fd {args.listen_fd}: not an open socket (the proxy's supervisor passes it; "
                         "start the proxy with --workers N instead)")
    _check_worker_flags(parser, args)
    if args.tmp_dir is not None and not args.tmp_dir.is_dir():
        parser.error(f"--tmp-dir {args.tmp_dir}: no such directory (the launcher makes one for every start of the "
                     "proxy; run alone, the proxy makes its own in TMPDIR: leave the flag out)")
    check_names(parser, args)
    check_engine_ids(parser, args)
    if args.colocated and (args.prefill or args.decode):
        parser.error("give either --colocated or --prefill/--decode instances, not both")
    if not args.colocated and not (args.prefill and args.decode):
        parser.error("a PD proxy needs at least one --prefill and one --decode instance (or --colocated)")


def _check_worker_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The internal flags a supervisor gives its workers (workers.worker_argv): together, and what they name exists."""
    given = [f"--{name.replace('_', '-')}" for name in ("listen_fd", "worker_index", "load_board")
             if getattr(args, name) is not None]
    if given and len(given) != 3:
        parser.error(f"{' and '.join(given)} without the rest of --listen-fd, --worker-index and --load-board (the "
                     "proxy's supervisor passes all three to its workers; start the proxy with --workers N instead)")
    if args.worker_index is not None and args.worker_index < 0:
        parser.error(f"--worker-index {args.worker_index}: must be 0 or more (the proxy's supervisor passes it; "
                     "start the proxy with --workers N instead)")
    if args.load_board is not None and not args.load_board.is_file():
        parser.error(f"--load-board {args.load_board}: no such file (the proxy's supervisor makes it; start the "
                     "proxy with --workers N instead)")


def _check_disaggregation(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The --disaggregate-* flags: positive, and the load rules only with --disaggregate-min-tokens."""
    if args.disaggregate_min_tokens is not None and args.disaggregate_min_tokens < 1:
        parser.error("--disaggregate-min-tokens must be 1 or more")
    if args.disaggregate_max_queue_tokens is not None and args.disaggregate_max_queue_tokens < 1:
        parser.error("--disaggregate-max-queue-tokens must be 1 or more")
    if args.disaggregate_max_queue_tokens is not None and args.disaggregate_min_tokens is None:
        parser.error("--disaggregate-max-queue-tokens spills prompts that per-request disaggregation would "
                     "send PD: give --disaggregate-min-tokens N too (1 sends every prompt PD until the queue fills)")
    itl = args.disaggregate_max_itl_ms
    if itl is not None and not 0 < itl < float("inf"):
        parser.error("--disaggregate-max-itl-ms must be a positive number of milliseconds")
    if itl is not None and args.disaggregate_min_tokens is None:
        parser.error("--disaggregate-max-itl-ms sends PD the prompts that per-request disaggregation would "
                     "run on a decode: give --disaggregate-min-tokens N too")


def _load_board(args: argparse.Namespace, instances: list[Instance]) -> LoadBoard | None:
    """A worker's row of the load board its supervisor made (None: a single proxy, which counts on its own)."""
    if args.load_board is None:
        return None
    try:
        return LoadBoard.open(args.load_board, [i.name for i in instances], args.worker_index)
    except (OSError, BoardMismatch) as exc:
        raise SystemExit(f"proxy[{args.worker_index}]: --load-board {exc} (the proxy's supervisor makes it for the "
                         "instances of its own flags: start the proxy with --workers N instead)") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    who = "proxy" if args.worker_index is None else f"proxy[{args.worker_index}]"
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {who} %(name)s: %(message)s")
    quiet_http_client_logs()
    workers = args.workers
    if workers == "auto" and args.listen_fd is None:  # from the CPUs this process may use, here
        auto = auto_workers()
        logging.getLogger(__name__).info("proxy: %s", auto.line())
        workers = auto.workers
    instances = (parse_instances("prefill", args.prefill) + parse_instances("decode", args.decode)
                 + parse_instances("colocated", args.colocated))
    if workers > 1 and args.listen_fd is None:  # this process supervises; the workers serve (workers.py)
        return Supervisor(list(sys.argv[1:] if argv is None else argv), args.host, args.port, workers,
                          args.drain_timeout, args.parent_pid, [i.name for i in instances], args.tmp_dir).run()
    for instance in instances:
        instance.planned_engine_id = args.engine_ids.get(instance.name, "")
    app = build_proxy_app(InstancePool(instances, args.routing_policy, args.health_timeout,
                                       args.restart_backoff, board=_load_board(args, instances)), args.request_timeout,
                          api_key=os.environ.get(API_KEY_ENV) or None,
                          deployment_secret=os.environ.get(SECRET_ENV) or None,
                          max_request_bytes=args.max_request_bytes, prefill_timeout_s=args.prefill_timeout,
                          load_failure_policy=args.load_failure_policy, migration_limit=args.migration_limit,
                          disaggregation=Disaggregation(args.disaggregate_min_tokens, args.tokenizer,
                                                        args.disaggregate_max_queue_tokens,
                                                        args.disaggregate_max_itl_ms, args.chat_template),
                          tokenizer_dir=args.tokenizer, chat_template=args.chat_template)
    freeze_startup_heap()  # no collector walk over the startup heap while relaying streams (memory/heap.py)
    drain_s = max(1, int(round(args.drain_timeout)))
    server = DrainingServer(proxy_server_config(app, args.host, args.port, args.access_log, drain_s),
                            on_shutdown=lambda: app.state.proxy_state.proxy.begin_shutdown(drain_s))
    if args.parent_pid is not None:
        watch_parent(args.parent_pid, lambda: setattr(server, "should_exit", True))
    # A worker accepts on the supervisor's socket; a single proxy binds its own.
    server.run(sockets=None if args.listen_fd is None else [socket.socket(fileno=args.listen_fd)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
