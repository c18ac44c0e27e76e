"""What `pdlaunch render kubernetes` refuses in KV transfer between prefill and decode of different TP sizes.

Such a transfer is resharded (kv_transfer/reshard.py): each decode rank reads whole blocks of the prefill instance
(a pull) at one address (distributed/tp_connector.py). Every instance is a pod of its own, so a host of its own to
the transfer: on CUDA, `transfer_mode: auto` resolves push between pods under NIXL (kv_transfer/transfer_mode.py),
and a prefill group spread one rank per pod has an address per rank. The pods would fail (or, with
load_failure_policy recompute, compute again) every request's KV; render refuses that instead.
"""

from __future__ import annotations

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.problems import Problem, problem
from pdlaunch.config.topology_config import group_tp_field


def reshard_problems(cfg: DeploymentConfig, gpus_per_node: int) -> list[Problem]:
    """Prefill and decode groups of different TP sizes whose KV the pods could not reshard: over push (given, or
    what NIXL's auto resolves to between pods on CUDA), or from a prefill group spread one rank per pod."""
    if cfg.colocated:
        return []
    prefill = [(i, g.tp or 1) for i, g in enumerate(cfg.instances) if g.role == "prefill" and g.count > 0]
    decode = {g.tp or 1 for g in cfg.instances if g.role == "decode" and g.count > 0}
    pairs = sorted({(p_tp, d_tp) for _, p_tp in prefill for d_tp in decode if p_tp != d_tp})
    if not pairs:
        return []
    problems: list[Problem] = []
    mode = cfg.kv_transfer.transfer_mode
    auto_pushes = mode == "auto" and cfg.device == "cuda" and cfg.kv_transfer.connector == "nixl"
    if mode == "push" or auto_pushes:
        p_tp, d_tp = pairs[0]
        why = "is push" if mode == "push" else "auto resolves to push between pods (each pod is its own host)"
        problems.append(problem("kv_transfer.transfer_mode", f"prefill TP {p_tp} and decode TP {d_tp} differ, so KV "
                                f"is resharded, which reads (pulls) prefill blocks, but transfer_mode {why}",
                                "give prefill and decode the same TP size, use --transfer-mode pull where decode "
                                "pods can READ prefill GPUs (e.g. GPUDirect RDMA), or --kv-connector mooncake"))
    for i, p_tp in prefill:
        if cfg.device == "cuda" and p_tp > gpus_per_node and any(d_tp != p_tp for d_tp in decode):
            problems.append(problem(group_tp_field(cfg.parallel, cfg.instances[i], i), f"prefill TP {p_tp} is "
                                    f"more than --gpus-per-node "
                                    f"{gpus_per_node}, so it runs one pod per rank, and decode TP "
                                    f"{', '.join(map(str, sorted(decode - {p_tp})))} differs: resharding reads every "
                                    "prefill rank at one address", "give prefill and decode the same TP size, or "
                                    "keep the prefill TP within one node"))
    return problems
