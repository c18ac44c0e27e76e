"""What each launcher backend (`launcher.backend`, `--backend`) needs, read before the config is checked.

- local: nothing; the config's own `parallel.nodes` (if any) are the nodes.
- slurm: a SLURM allocation (`salloc`/`sbatch`): SLURM_JOB_ID and SLURM_JOB_NODELIST set, `scontrol`
  and `srun` on PATH. The allocation's nodes become `parallel.nodes`, in SLURM's order, each at the address
  `scontrol show node` gives (NodeAddr); devices listed in the config's nodes are kept. The KV side
  channel of the nixl and mooncake connectors then binds every interface (each rank advertises its own node's
  address), as any multi-node deployment needs (storage opens none: the field is left as the user set it), and
  a deployment secret is made when none is given.
- ray: the ray package and a Ray cluster at launcher.ray_address that has every resource the config
  names and room for the whole deployment (config/ray_check.py); a deployment secret is made when none is given.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Mapping

from pdlaunch.config.addresses import host_syntax_error
from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.rules.roles import LOOPBACK_HOSTS
from pdlaunch.config.target_host import TargetHost
from pdlaunch.config.topology_config import NodeConfig
from pdlaunch.errors import PdlaunchError

SCONTROL_TIMEOUT_S = 30.0
FIELD = "launcher.backend"
SECRET_ENV = "PDLAUNCH_DEPLOYMENT_SECRET"


def with_backend_nodes(cfg: DeploymentConfig, env: Mapping[str, str] | None = None) -> DeploymentConfig:
    """`cfg` with the nodes its backend provides. Raises PdlaunchError (field launcher.backend) saying
    what is missing: no allocation, no scontrol, fewer nodes than the config lists."""
    if cfg.launcher.backend == "local":
        return cfg
    if cfg.launcher.backend == "ray":
        from pdlaunch.config.ray_check import with_ray_cluster

        return with_shared_secret(with_ray_cluster(cfg), os.environ if env is None else env)
    env = os.environ if env is None else env
    addresses = slurm_node_addresses(env)
    if len(cfg.parallel.nodes) > len(addresses):
        raise PdlaunchError(f"the config lists {len(cfg.parallel.nodes)} nodes but the SLURM allocation has "
                            f"{len(addresses)} ({env.get('SLURM_JOB_NODELIST')})", field="parallel.nodes",
                            hint=f"allocate {len(cfg.parallel.nodes)} nodes (sbatch/salloc --nodes "
                                 f"{len(cfg.parallel.nodes)}) or list fewer nodes")
    devices = [node.devices for node in cfg.parallel.nodes] + [[] for _ in addresses[len(cfg.parallel.nodes):]]
    out = cfg.model_copy(deep=True)
    out.parallel.nodes = [NodeConfig(address=a, devices=d) for a, d in zip(addresses, devices)]
    if len(addresses) > 1 and out.kv_transfer.side_channel_host in LOOPBACK_HOSTS \
            and out.kv_transfer.connector in ("nixl", "mooncake"):
        out.kv_transfer.side_channel_host = "0.0.0.0"
    return with_shared_secret(out, env)


def backend_target(cfg: DeploymentConfig) -> TargetHost | None:
    """The GPU host `cfg` is checked against when its instances do not run on this machine: under --backend ray
    the cluster's GPU nodes (config/ray_cluster.cluster_gpus); None otherwise. Raises PdlaunchError."""
    if cfg.launcher.backend != "ray":
        return None
    from pdlaunch.config.ray_cluster import cluster_gpus

    found = cluster_gpus(cfg)
    return None if found is None else TargetHost(gpus=found[0], gpu_memory_gib=found[1], source="the Ray cluster")


def with_shared_secret(cfg: DeploymentConfig, env: Mapping[str, str]) -> DeploymentConfig:
    """Every node must share one deployment secret; the slurm and ray launchers hand the config, secret
    included, to every node's processes, so one is made here when none is given."""
    if cfg.security.deployment_secret or env.get(SECRET_ENV):
        return cfg
    out = cfg.model_copy(deep=True)
    out.security.deployment_secret = secrets.token_hex(32)
    return out


def slurm_node_addresses(env: Mapping[str, str]) -> list[str]:
    """The allocation's nodes, in SLURM's order, as addresses other nodes reach them at."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not env.get("SLURM_JOB_ID") or not nodelist:
        raise PdlaunchError("--backend slurm runs inside a SLURM allocation, and SLURM_JOB_ID / "
                            "SLURM_JOB_NODELIST are not set here", field=FIELD,
                            hint="submit it with sbatch (see examples/slurm/pd-1p1d.sbatch) or run it from "
                                 "`salloc --nodes N`; or use --backend local")
    for tool, why in (("scontrol", "to read the allocation's nodes"), ("srun", "to start a step on each node")):
        if shutil.which(tool) is None:
            raise PdlaunchError(f"--backend slurm needs `{tool}` on PATH {why}", field=FIELD,
                                hint="load the SLURM module / add SLURM's bin directory to PATH")
    names = _scontrol(["show", "hostnames", nodelist]).split()
    if not names:
        raise PdlaunchError(f"SLURM_JOB_NODELIST {nodelist!r} names no node", field=FIELD,
                            hint="run inside the allocation's batch script or salloc shell")
    return [_node_address(name) for name in names]


def _node_address(name: str) -> str:
    """NodeAddr of `name` (slurm.conf), which is its hostname unless the cluster maps it elsewhere."""
    address = name
    for word in _scontrol(["show", "node", "--oneliner", name]).split():
        if word.startswith("NodeAddr="):
            address = word.removeprefix("NodeAddr=") or name
            break
    reason = host_syntax_error(address)
    if reason is not None:
        raise PdlaunchError(f"SLURM node {name} has the address {address!r} (`scontrol show node {name}`, NodeAddr), "
                            f"which other nodes cannot connect to: {reason}", field=FIELD,
                            hint="set the node's NodeAddr in slurm.conf to its IP address or host name, or run "
                            "in an allocation of other nodes")
    return address


def _scontrol(args: list[str]) -> str:
    try:
        done = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=SCONTROL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise PdlaunchError(f"`scontrol {' '.join(args)}` did not answer within {SCONTROL_TIMEOUT_S:.0f}s",
                            field=FIELD, hint="check that slurmctld is reachable (`scontrol ping`)") from None
    if done.returncode != 0:
        raise PdlaunchError(f"`scontrol {' '.join(args)}` failed: {_scontrol_reason(done.stderr, done.returncode)}",
                            field=FIELD, hint="check that slurmctld is reachable (`scontrol ping`)")
    return done.stdout


def _scontrol_reason(stderr: str, returncode: int) -> str:
    """Why scontrol stopped, in one line: its `fatal:` line, else its last line (it writes each step it tried as a
    line of its own, `scontrol: error: ...`, before the one that ends it)."""
    lines = [line.strip().removeprefix("scontrol: ") for line in stderr.splitlines() if line.strip()]
    if not lines:
        return f"exit status {returncode}"
    fatal = [line.removeprefix("fatal: ") for line in lines if line.startswith("fatal: ")]
    return fatal[-1] if fatal else lines[-1]
