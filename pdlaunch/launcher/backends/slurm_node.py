"""One node's launcher under `--backend slurm`: `python -m pdlaunch.launcher.backends.slurm_node --node-rank K`,
started by launcher/backends/slurm.py through srun. It reads the deployment from PDLAUNCH_SLURM_DEPLOYMENT,
checks it against this node (ports, checkpoint, log directory, and what the batch process left to the nodes:
`device: auto`, CUDA, GPU count and memory, sleep mode / the cumem allocator, RAM; too few GPUs for the ranks placed
here is said in SLURM's terms, slurm_node_gpus.py), says which device it serves
on and serves node K exactly as `pdlaunch serve --node-rank K` does; a failed check is one line, `error: node K:
FIELD: MESSAGE`, which the batch process repeats (slurm_lines.py). Its logs go to LOG_DIR/nodeK/ (log_dir is
often shared).
"""

from __future__ import annotations

import os
import signal
import sys

from pydantic import ValidationError

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.errors_format import loc_to_path
from pdlaunch.config.validate import validate_deployment
from pdlaunch.errors import ArgumentParser, PdlaunchError, error_text
from pdlaunch.launcher.backends.slurm import DEPLOYMENT_ENV, STOP_SIGNAL
from pdlaunch.launcher.backends.slurm_lines import device_line, error_line
from pdlaunch.launcher.backends.slurm_node_gpus import gpu_shortage
from pdlaunch.launcher.serve import run_serve
from pdlaunch.memory import host_devices


def node_config(raw: str, node_rank: int) -> DeploymentConfig:
    """The deployment as node `node_rank` runs it, checked on this node. Raises PdlaunchError."""
    cfg = _parsed(raw)
    if not 0 <= node_rank < len(cfg.parallel.nodes):  # a negative one would be refused by the assignment below
        raise PdlaunchError(f"node rank {node_rank} is not among the deployment's {len(cfg.parallel.nodes)} nodes",
                            hint=f"--node-rank is 0..{len(cfg.parallel.nodes) - 1}")
    cfg.launcher.backend = "local"  # this process runs its node's processes itself
    cfg.parallel.node_rank = node_rank
    cfg.log_dir = os.path.join(cfg.log_dir, f"node{node_rank}")
    # A node's GPUs are what SLURM gave its step: too few is said in SLURM's terms (slurm_node_gpus.py).
    seen = host_devices.device_count() if cfg.device != "cpu" else 0
    short = gpu_shortage(cfg, node_rank, seen, os.environ) if cfg.device == "cuda" or seen else None
    problems, resolved = validate_deployment(cfg, target=None)
    if short is not None:
        shortage, explained = short
        problems = [shortage, *(p for p in problems if p not in explained)]
    if problems:
        raise PdlaunchError("; ".join(f"{field}: {message}" for field, message in problems),
                            hint=f"checked on node {node_rank} ({cfg.parallel.nodes[node_rank].address})")
    return resolved


def _parsed(raw: str) -> DeploymentConfig:
    """The deployment the batch process handed over. The value comes from outside this process (a step started by
    hand, an environment altered or cut short on the way): a bad one is PdlaunchError naming the variable. Its
    values are not shown: the value holds the deployment secret and API key, and the step's output is a log."""
    try:
        return DeploymentConfig.model_validate_json(raw)
    except ValidationError as exc:
        found = "; ".join(f"{loc_to_path(tuple(err['loc']))}: {error_text(err)}"
                          for err in exc.errors(include_url=False, include_input=False))
        raise PdlaunchError(f"does not hold a valid deployment: {found}", field=DEPLOYMENT_ENV,
                            hint="`pdlaunch serve --backend slurm` sets it for its srun steps: start the deployment "
                                 "with that, not this module by hand") from None


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m pdlaunch.launcher.backends.slurm_node", description=__doc__)
    parser.add_argument("--node-rank", required=True, type=int, help="This node's index in parallel.nodes.")
    args = parser.parse_args(argv)
    raw = os.environ.get(DEPLOYMENT_ENV)
    if not raw:
        print(f"error: {DEPLOYMENT_ENV} is not set: this module is started by `pdlaunch serve --backend slurm`",
              file=sys.stderr)
        return 1
    # srun forwards SIGUSR1 (launcher/backends/slurm.py sends it to stop): stop as on SIGTERM.
    signal.signal(STOP_SIGNAL, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    try:
        cfg = node_config(raw, args.node_rank)
        print(device_line(args.node_rank, cfg.device), flush=True)
        return run_serve(cfg)
    except PdlaunchError as exc:
        print(error_line(args.node_rank, exc), file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
