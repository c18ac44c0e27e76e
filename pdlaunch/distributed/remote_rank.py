"""A TP rank whose instance's rank 0 runs on another node:
`python -m pdlaunch.distributed.remote_rank --deployment FILE --instance SPEC_JSON --rank R --placement JSON`.

This node's launcher starts it (launcher/plan.py plans one per remote rank). It finds rank 0 through
the group's rendezvous store (the rank-0 node's address, the instance's master_port), connects to
it (remote_link.py), receives what only rank 0 knows (messages.Setup: device type, dtype,
max_model_len), then runs exactly what a local worker runs (worker.serve_rank) over the TCP connection.

Exit codes: 0 once rank 0 ended the session (shutdown, or its connection closed) or this node's
launcher stopped it (SIGTERM); 1 when it could not join its group or failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec, instance_spec_from_json
from pdlaunch.distributed.join_waits import RENDEZVOUS_SETTING
from pdlaunch.distributed.link_socket import link_timed_out, peer_address
from pdlaunch.distributed.message_stream import recv_as
from pdlaunch.distributed.messages import Setup
from pdlaunch.distributed.parallel_state import SealedStore, store_key
from pdlaunch.distributed.placement import RankPlacement, link_authkey
from pdlaunch.distributed.remote_link import connect_to_rank0, open_store
from pdlaunch.distributed.worker import serve_rank
from pdlaunch.errors import ArgumentParser, EngineError, PdlaunchError, argument_type

log = logging.getLogger("pdlaunch.remote_rank")

# This node's launcher may be started long before node 0's: wait this long for rank 0's store (or
# parallel.rendezvous_timeout_seconds, where that is longer).
STORE_WAIT_S = 900.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m pdlaunch.distributed.remote_rank", description=__doc__)
    parser.add_argument("--deployment", required=True, type=Path, help="DeploymentConfig as JSON.")
    parser.add_argument("--instance", required=True, type=argument_type(instance_spec_from_json),
                        help="InstanceSpec as JSON (as this rank sees it).")
    parser.add_argument("--rank", required=True, type=int, help="This process's TP rank.")
    parser.add_argument("--placement", required=True, help="RankPlacement as JSON.")
    return parser.parse_args(argv)


def _stop(signum: int, _: FrameType | None) -> None:
    # The launcher of this node stops its children with SIGTERM: leave the group (rank 0 then sees
    # this rank gone and takes its instance down, naming it).
    raise SystemExit(0)


def wait_for_setup(conn: Connection, instance: str, rendezvous_timeout_s: float) -> Setup:
    """Rank 0's Setup on `conn`. Rank 0 sends it once every rank on another node has connected, and waits
    `rendezvous_timeout_s` (parallel.rendezvous_timeout_seconds) for that from its own start, so this waits as
    long; EngineError naming the wait and the setting when it does not come."""
    if not conn.poll(rendezvous_timeout_s):
        raise EngineError(f"rank 0 of {instance} sent no setup within {rendezvous_timeout_s:g}s "
                          f"({RENDEZVOUS_SETTING}) of this rank connecting: it sends it once every TP rank on another "
                          "node has connected, so one has not", field=RENDEZVOUS_SETTING,
                          hint=f"rank 0's log names the ranks it is waiting for; one whose node or pod starts late "
                          f"(an image pull, a pod waiting to be scheduled) needs a larger {RENDEZVOUS_SETTING}, "
                          "the same on every node")
    return recv_as(conn, f"rank 0 of {instance}", Setup)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = DeploymentConfig.model_validate_json(args.deployment.read_text())
    spec: InstanceSpec = args.instance
    placement = RankPlacement.model_validate_json(args.placement)
    rank = args.rank
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {spec.name} rank {rank} %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the launcher, which sends SIGTERM
    signal.signal(signal.SIGTERM, _stop)
    host, port = placement.hosts[0], spec.master_port
    if port is None:
        log.error("instance %s has no rendezvous port: set parallel.master_port", spec.name)
        return 1
    link: str | None = None
    try:
        log.info("TP rank %d of %s: waiting for rank 0 at %s:%d (node %d)", rank, spec.name, host, port,
                 placement.nodes[0])
        rendezvous_timeout_s = config.parallel.rendezvous_timeout_seconds
        store = SealedStore(open_store(host, port, max(STORE_WAIT_S, rendezvous_timeout_s)),
                            store_key(config, spec, port))
        conn = connect_to_rank0(store, rank, link_authkey(config, spec.name, port))
        link = peer_address(conn)
        setup = wait_for_setup(conn, spec.name, rendezvous_timeout_s)
    except (PdlaunchError, OSError, EOFError) as exc:
        lost = link_timed_out(exc, f"rank 0 of {spec.name}", link) if link is not None else None
        log.error("TP rank %d cannot join %s: %s", rank, spec.name, lost or exc)
        return 1
    # rank 0's config names its own node's loopback as master_addr; this rank's store client is at `host`
    config = config.model_copy(update={"parallel": config.parallel.model_copy(update={"master_addr": host})})
    serve_rank(rank, config, spec, setup.device_type, setup.dtype_name, setup.max_model_len, port, conn, os.getppid(),
               store)
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
