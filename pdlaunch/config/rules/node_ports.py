"""Fixed ports the port plan puts on the other nodes of a multi-node deployment, probed from here before
anything starts there: something that listens at one now stops that node's launcher, which bind-tests every
port it claims (launcher/ports.py). This machine's own node is bind-tested instead (resources.busy_port_warnings).

Probed: under `--backend local` every node but parallel.node_rank; under slurm every node of the allocation
(the batch process is no node's launcher, and its srun steps start after this); never under ray (Ray places
the ranks itself) nor on one node. A TCP connect sees what listens on the node's address or on every
interface, not what listens on that node's loopback only.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdlaunch.config.addresses import host_port, is_wildcard, probe_ports
from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.problems import Problem, problem
from pdlaunch.config.rules.resources import PortRange, port_plan
from pdlaunch.config.rules.roles import LOOPBACK_HOSTS
from pdlaunch.errors import PdlaunchError

_SHOWN = 5  # ports named per message; the rest are counted


@dataclass(frozen=True)
class NodePortsInUse:
    """Ports of one planned range on another node that something listens at now."""

    used: PortRange
    host: str  # the address probed
    ports: list[int]

    def what(self) -> str:
        shown = ", ".join(host_port(self.host, port) for port in self.ports[:_SHOWN])
        more = f" and {len(self.ports) - _SHOWN} more" if len(self.ports) > _SHOWN else ""
        return (f"{self.used.label()} on node {self.used.node}: something listens at {shown}{more} now, so node "
                f"{self.used.node}'s launcher would stop there")

    def hint(self) -> str:
        return f"stop what listens there or choose another port; `ss -ltnp` on node {self.used.node} names it"

    def as_problem(self) -> Problem:
        return problem(self.used.field, self.what(), self.hint())


def probed_nodes(cfg: DeploymentConfig) -> list[int]:
    """The nodes whose fixed ports are probed from this process (see the module's docstring)."""
    if not cfg.parallel.nodes or cfg.launcher.backend == "ray":
        return []
    every = range(len(cfg.parallel.nodes))
    return list(every) if cfg.launcher.backend == "slurm" else [k for k in every if k != cfg.parallel.node_rank]


def _probe_host(cfg: DeploymentConfig, used: PortRange) -> str:
    """Where a range's ports are reached: the node's address, or the proxy's own address when it binds one."""
    if used.field == "proxy.port" and not is_wildcard(cfg.proxy.host) \
            and cfg.proxy.host not in LOOPBACK_HOSTS:
        return cfg.proxy.host
    return cfg.parallel.nodes[used.node].address


def node_port_findings(cfg: DeploymentConfig) -> tuple[list[NodePortsInUse], list[Problem]]:
    """The planned ranges of the probed nodes with ports something listens at now, and a warning per node that
    did not answer (its ports unchecked). The ranges are the ones each node's launcher plans, whatever GPUs this
    machine has (config/port_plan.py). Takes PROBE_TIMEOUT_S at most per 256 ports when a node does not answer;
    nothing when no node is probed."""
    nodes = probed_nodes(cfg)
    if not nodes:
        return [], []
    ranges = [(used, _probe_host(cfg, used)) for used in port_plan(cfg)
              if used.node in nodes and used.first >= 1 and used.last <= 65535]
    if not ranges:
        return [], []
    answers = probe_ports((host, port) for used, host in ranges for port in range(used.first, used.last + 1))
    in_use: list[NodePortsInUse] = []
    unreached: dict[int, list[tuple[PortRange, str]]] = {}  # node -> (range, why) for ranges not fully answered
    for used, host in ranges:
        found = [(port, answers[(host, port)]) for port in range(used.first, used.last + 1)]
        busy = [port for port, answer in found if answer.state == "listening"]
        if busy:
            in_use.append(NodePortsInUse(used, host, busy))
        missed = [answer.reason for _, answer in found if answer.state == "unreached"]
        if missed:
            unreached.setdefault(used.node, []).append((used, missed[0]))
    return in_use, [_unreached_warning(cfg, node, items) for node, items in sorted(unreached.items())]


def _unreached_warning(cfg: DeploymentConfig, node: int, items: list[tuple[PortRange, str]]) -> Problem:
    address = cfg.parallel.nodes[node].address
    labels = ", ".join(used.label() for used, _ in items)
    return problem(f"parallel.nodes[{node}].address",
                   f"node {node} ({address}) could not be reached to check its ports ({items[0][1]}), so these are "
                   f"not checked: {labels}",
                   f"check that this machine reaches {address}, or ignore this when checking away from the cluster")


def node_port_warnings(cfg: DeploymentConfig) -> list[Problem]:
    """check-config's: a port in use on another node, like one in use here, is a warning (it may be freed
    before serve starts there, and check-config also runs next to a deployment that serves)."""
    in_use, unreached = node_port_findings(cfg)
    return [found.as_problem() for found in in_use] + unreached


def check_node_ports(cfg: DeploymentConfig) -> list[Problem]:
    """Before the other nodes' launchers start (`--backend slurm`, before its srun steps): raises
    PdlaunchError naming the field of the first range with a port in use, as the launcher itself stops
    at the first; returns the warnings for nodes that did not answer."""
    in_use, unreached = node_port_findings(cfg)
    if in_use:
        first = in_use[0]
        raise PdlaunchError(first.what(), field=first.used.field, hint=first.hint())
    return unreached
