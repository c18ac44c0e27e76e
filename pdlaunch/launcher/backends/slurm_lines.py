"""What a node's step under `--backend slurm` (slurm_node.py) says in its output for the batch process (slurm.py),
which reads it back from LOG_DIR/slurm-nodeK.log (srun's output: the batch process writes that file itself, so
no shared filesystem is needed):

- `node K: device cuda`, once the node's checks passed and before it starts anything: the device it serves on.
  `device: auto` is resolved by each node's step on its own machine, never by the batch process (salloc's shell
  is often a login node without GPUs, and `auto` there would make every node serve on CPU). The nodes must
  agree: one that resolves otherwise than node 0 (its GPUs not visible to the job) stops the deployment with
  `error: node K: device: ...`. The steps start at once, without waiting for each other; the batch process
  reads these lines while it waits for the proxy and supervises, so a disagreement stops the deployment within
  a poll of the second line.
- `error: node K: FIELD: MESSAGE (HINT)`, why the step stopped (its checks, its plan): the batch process repeats
  it as its own error line instead of the step's bare exit code.
- `error: MESSAGE; stopping the deployment`, then `last N lines of LOG:` and those lines: the node's launcher
  gave up on one of its processes (launcher/serve.report_failure). A step that ended without its own error line
  has its output shown from there (failure_lines), so that the node's reason is not cut off by the tail.

srun labels every line with its task number (`0: node 1: device cuda`) under `--label` or SLURM_LABELIO. The
batch process starts its steps without SLURM_LABELIO (slurm.py), and a label that is there anyway (a site's
srun wrapper adding --label) is skipped when these lines are read.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from rich.console import Console

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.errors import PdlaunchError
from pdlaunch.launcher.log_tail import LogUnreadable, bounded_read

_DEVICE = re.compile(r"node (\d+): device (cpu|cuda)\b")
_SRUN_LABEL = re.compile(r"\s*\d+: ")  # srun --label: the task number, padded to the widest
logger = logging.getLogger(__name__)
HEAD_BYTES = 64 * 1024  # the device line comes before anything the node's launcher starts


def device_line(node: int, device: str) -> str:
    """What node `node`'s step prints once its checks passed: the device it serves on (`auto` resolved there)."""
    return f"node {node}: device {device}"


def error_line(node: int, error: PdlaunchError) -> str:
    """What node `node`'s step prints (stderr) when it stops on `error`: one line."""
    return f"error: node {node}: " + "; ".join(error.render().splitlines())


def unlabelled(line: str) -> str:
    """`line` without the task label srun puts before it under --label ("0: "), if any."""
    label = _SRUN_LABEL.match(line)
    return line[label.end():] if label else line


def failure_lines(lines: list[str], count: int) -> list[str]:
    """What of a step's last output `lines` the batch process shows when the step ended without its own error line:
    from the last error its node's launcher printed (`error: ...`, which the last lines of the failed process's log
    follow, up to 20, then srun's own lines) to the end, else the last `count`."""
    starts = [i for i, line in enumerate(lines) if unlabelled(line).startswith("error: ")]
    return lines[starts[-1]:] if starts else lines[-count:]


def show_lines(console: Console, log_path: Path, lines: list[str]) -> None:
    """`lines` of a step's output (LOG_DIR/slurm-nodeK.log), as serve.report_failure shows a failed child's."""
    if lines:
        console.print(f"last {len(lines)} lines of {log_path}:", highlight=False, markup=False, soft_wrap=True)
        for line in lines:
            console.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)


def node_error(lines: list[str], node: int) -> str | None:
    """The last error node `node`'s step printed (error_line, without `error: `), or None (it printed none)."""
    prefix = f"error: node {node}: "
    found = [text.removeprefix("error: ") for text in map(unlabelled, lines) if text.startswith(prefix)]
    return found[-1] if found else None


def read_head(log_path: Path) -> str:
    """The first HEAD_BYTES of `log_path`; blocks as the file system does."""
    with open(log_path, "rb") as f:
        return f.read(HEAD_BYTES).decode(errors="replace")


def reported_device(log_path: Path, node: int) -> str | None:
    """The device node `node`'s step said it serves on (device_line), or None while it has not said so. Read on the
    batch launcher's main thread, so within log_tail.TAIL_TIMEOUT_S (`bounded_read`): a log on a hung file system
    counts as not said yet (logged, naming the file), never a launcher held in open() or read()."""
    try:
        head = bounded_read(log_path, lambda: read_head(log_path))
    except LogUnreadable as exc:
        if exc.waited:  # once per stuck read: the next polls are told at once while it is stuck
            logger.warning("node %d's device line not read yet: %s", node, exc)
        return None
    except OSError:
        return None
    for line in head.split("\n")[:-1]:  # whole lines only: srun may be writing the last one
        match = _DEVICE.match(unlabelled(line))
        if match and int(match.group(1)) == node:
            return match.group(2)
    return None


class NodeDevices:
    """The devices the nodes' steps say they serve on, read from their output (`log_paths[K]`: node K's) until
    every node has said; a node that disagrees with node 0 is an error."""

    def __init__(self, cfg: DeploymentConfig, log_paths: list[Path]) -> None:
        self.addresses = [node.address for node in cfg.parallel.nodes]
        self.log_paths = log_paths
        self.devices: dict[int, str] = {}  # node -> device, as its step said

    def disagreement(self) -> tuple[int, PdlaunchError] | None:
        """The first node whose device differs from node 0's and why, or None (none does, as far as said)."""
        for node, path in enumerate(self.log_paths):
            if node not in self.devices and (device := reported_device(path, node)) is not None:
                self.devices[node] = device
        first = self.devices.get(0)
        for node, device in sorted(self.devices.items()):
            if first is not None and device != first:
                without = node if device == "cpu" else 0
                return node, PdlaunchError(
                    f"auto resolved to {device} on node {node} ({self.addresses[node]}) but to {first} on node 0 "
                    f"({self.addresses[0]}); every node must serve on the same device", field="device",
                    hint=f"node {without} sees no CUDA device: make its GPUs visible to the job (e.g. "
                         "--gpus-per-node), or set --device cuda to have a node without one refuse, or --device cpu")
        return None
