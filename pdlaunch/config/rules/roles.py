"""Cross-field rules on the resolved config: roles and nodes, what TP splits, P/D TP ratio, cache sizes.

Each rule takes the resolved config (group.tp filled in) and returns problems; none raises.
"""

from __future__ import annotations

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.launcher_config import STALL_PROBE_INTERVAL_S, LauncherConfig
from pdlaunch.config.model_info import ModelInfo
from pdlaunch.config.placement import spans_nodes
from pdlaunch.config.problems import Problem, problem
from pdlaunch.config.rules.group_fields import GroupFinding, by_source
from pdlaunch.config.strict_model import BLOCK_SIZES
from pdlaunch.config.topology_config import (
    InstanceGroupConfig,
    group_expert_parallel,
    group_kv_cache_dtype,
    group_tp_field,
)
from pdlaunch.model.tp_split import TPRule, split_problems  # torch-free

# More ranks (processes, one per GPU on CUDA) than a deployment runs: the rules after size_problems walk every
# rank, so a typo such as `count: 3000000` must stop there instead of filling memory.
MAX_RANKS = 16384


def tp_sources(cfg: DeploymentConfig) -> list[str]:
    """The field each group of the resolved `cfg` takes its TP size from (topology_config.group_tp_field)."""
    return [group_tp_field(cfg.parallel, group, i) for i, group in enumerate(cfg.instances)]


def size_problems(cfg: DeploymentConfig) -> list[Problem]:
    """No group, and not all groups together, of more than MAX_RANKS ranks (count x TP)."""
    problems: list[Problem] = []
    too_large: list[GroupFinding] = []
    sources = tp_sources(cfg)
    total = 0
    for i, group in enumerate(cfg.instances):
        tp = group.tp or 1
        total += group.count * tp
        if tp > MAX_RANKS:
            # a flag's or deployment-wide key's problem is named after it (group_fields.py): no other keys to list
            hint = ("give the GPUs one instance spans (here, or by parallel.tp / prefill_tp / decode_tp: --tp, "
                    "--prefill-tp, --decode-tp)" if sources[i].startswith("instances[")
                    else "give the GPUs one instance spans")
            too_large.append(GroupFinding(i, sources[i], f"TP {tp} is more than {MAX_RANKS} ranks", hint))
        elif group.count * tp > MAX_RANKS:
            problems.append(problem(f"instances[{i}].count",
                                    f"{group.count} instances x TP {tp} is {group.count * tp} ranks, more than "
                                    f"{MAX_RANKS}", "give the number of instances of this group (--prefill, "
                                    "--decode)"))
    problems = by_source(cfg, too_large, sources) + problems
    if not problems and total > MAX_RANKS:
        problems.append(problem("instances", f"the groups have {total} ranks in all, more than {MAX_RANKS}",
                                "give fewer instances or smaller TP sizes"))
    return problems


def role_problems(cfg: DeploymentConfig) -> list[Problem]:
    """At least one prefill and one decode instance, unless colocated; no P/D groups when colocated."""
    problems: list[Problem] = []
    counts = {"prefill": 0, "decode": 0, "colocated": 0}
    for group in cfg.instances:
        counts[group.role] += group.count
    if cfg.colocated:
        for i, group in enumerate(cfg.instances):
            if group.role != "colocated" and group.count > 0:
                problems.append(problem(f"instances[{i}].role", f"a {group.role} group in a colocated deployment",
                                        "remove the group (and --prefill/--decode) or drop colocated"))
        if counts["colocated"] == 0:
            problems.append(problem("instances", "colocated deployment without a colocated instance",
                                    "add `{role: colocated, count: 1}` to instances"))
        if cfg.proxy.disaggregate_min_tokens is not None:
            problems.append(problem("proxy.disaggregate_min_tokens", "a colocated deployment never disaggregates "
                                    "(every prompt runs where it decodes)", "drop it, or drop colocated"))
        if cfg.proxy.disaggregate_max_queue_tokens is not None:
            problems.append(problem("proxy.disaggregate_max_queue_tokens", "a colocated deployment has no "
                                    "prefill queue to spill from", "drop it, or drop colocated"))
        if cfg.proxy.disaggregate_max_itl_ms is not None:
            problems.append(problem("proxy.disaggregate_max_itl_ms", "a colocated deployment never "
                                    "disaggregates (every prompt runs where it decodes)", "drop it, or drop colocated"))
        return problems
    for i, group in enumerate(cfg.instances):
        if group.role == "colocated":
            problems.append(problem(f"instances[{i}].role", "a colocated group needs `colocated: true`",
                                    "pass --colocated, or use roles prefill and decode"))
    for role in ("prefill", "decode"):
        if counts[role] == 0:
            problems.append(problem("instances", f"no {role} instance (PD needs at least one prefill and one decode)",
                                    f"pass --{role} 1 or add `{{role: {role}, count: 1}}`; or use --colocated"))
    if cfg.proxy.disaggregate_max_queue_tokens is not None and cfg.proxy.disaggregate_min_tokens is None:
        problems.append(problem("proxy.disaggregate_max_queue_tokens", "it spills prompts that per-request "
                                "disaggregation would send PD, and proxy.disaggregate_min_tokens is not set",
                                "set disaggregate_min_tokens too (1 sends every prompt PD until the queue fills)"))
    if cfg.proxy.disaggregate_max_itl_ms is not None and cfg.proxy.disaggregate_min_tokens is None:
        problems.append(problem("proxy.disaggregate_max_itl_ms", "it sends PD the prompts that per-request "
                                "disaggregation would run on a decode, and proxy.disaggregate_min_tokens is not set",
                                "set disaggregate_min_tokens too, or drop it"))
    return problems


def kv_cache_dtype_problems(cfg: DeploymentConfig) -> list[Problem]:
    """Prefill and decode groups share one KV cache dtype: blocks move between them as stored, and the
    handshake would refuse every transfer. The first prefill group's is the reference."""
    if cfg.colocated:
        return []
    groups = [(i, g) for i, g in enumerate(cfg.instances) if g.role in ("prefill", "decode") and g.count > 0]
    if not groups:
        return []
    first, reference = groups[0]
    want = group_kv_cache_dtype(cfg.cache, reference)
    where = "cache.kv_cache_dtype" if reference.kv_cache_dtype is None else f"instances[{first}].kv_cache_dtype"
    why = "KV blocks move between prefill and decode as stored, and the KV handshake refuses a peer of another dtype"
    differ = [(i, g) for i, g in groups[1:] if group_kv_cache_dtype(cfg.cache, g) != want]
    # Groups taking a dtype the user set for the deployment (--kv-cache-dtype): one problem named after it, not a
    # group field each they never wrote. The reference then has its own (`where`), or they would agree with it.
    given = "kv_cache_dtype" in cfg.cache.model_fields_set
    taking = [(i, g) for i, g in differ if g.kv_cache_dtype is None and given]
    problems = [problem(f"instances[{i}].kv_cache_dtype",
                        f"this {g.role} group's KV cache is {group_kv_cache_dtype(cfg.cache, g)} but the "
                        f"{reference.role} group instances[{first}]'s is {want} ({where}): {why}",
                        "set one kv_cache_dtype for every prefill and decode group (cache.kv_cache_dtype / "
                        "--kv-cache-dtype) and drop the per-group ones")
                for i, g in differ if i not in dict(taking)]
    if taking:
        named = ", ".join(f"instances[{i}] ({g.role})" for i, g in taking)
        problems.append(problem("cache.kv_cache_dtype",
                                f"sets the KV cache of {named} to {cfg.cache.kv_cache_dtype}, but the "
                                f"{reference.role} group instances[{first}]'s is {want} ({where}): {why}",
                                f"set cache.kv_cache_dtype to {want}, or drop {where} (or set it to "
                                f"{cfg.cache.kv_cache_dtype})"))
    return problems


def stall_timeout_problems(cfg: DeploymentConfig) -> list[Problem]:
    """The stall deadlines fit inside the whole-request deadline, or they would never fire; a stall restart is
    longer than one slow probe."""
    problems: list[Problem] = []
    limit = cfg.proxy.request_timeout_seconds
    for name in ("health_timeout_seconds", "prefill_timeout_seconds"):
        value = getattr(cfg.proxy, name)
        if value is not None and value >= limit:
            problems.append(problem(f"proxy.{name}", f"{value:g}s is not below proxy.request_timeout_seconds "
                                    f"({limit:g}s)", f"use a value below {limit:g}"))
    return problems + stall_restart_problems(cfg)


def stall_restart_problems(cfg: DeploymentConfig) -> list[Problem]:
    """A stall counts from a probe's timeout, and the next probe comes STALL_PROBE_INTERVAL_S later and may take
    up to health_timeout_seconds to answer: one slow answer (a GC pause, a loaded host) reads as a stall that long.
    A stall_restart_seconds not above that would kill a live instance for it."""
    restart_s, timeout_s = cfg.supervision.stall_restart_seconds, cfg.proxy.health_timeout_seconds
    floor = timeout_s + STALL_PROBE_INTERVAL_S
    if restart_s is None or restart_s > floor:
        return []
    return [problem("supervision.stall_restart_seconds",
                    f"{restart_s:g}s cannot tell a stall from one slow /health answer: after a probe times out "
                    f"(proxy.health_timeout_seconds: {timeout_s:g}s) the next comes {STALL_PROBE_INTERVAL_S:g}s "
                    f"later and may take {timeout_s:g}s to answer, so a live instance that answered once late would "
                    f"read as stalled for up to {floor:g}s and be killed",
                    f"set supervision.stall_restart_seconds above {floor:g} (e.g. {max(10.0, 2 * floor):g}), or "
                    f"lower proxy.health_timeout_seconds below {restart_s - STALL_PROBE_INTERVAL_S:g}"
                    if restart_s > STALL_PROBE_INTERVAL_S else
                    f"set supervision.stall_restart_seconds above {floor:g} (e.g. {max(10.0, 2 * floor):g})")]


def ray_field_problems(cfg: DeploymentConfig) -> list[Problem]:
    """launcher.ray_* mean something only with --backend ray: set under another backend, refused (a forgotten
    --backend ray would otherwise start everything on this machine). Given at its default: given_ray_field_problems."""
    defaults = LauncherConfig()
    return [_ray_only(cfg, name) for name in _RAY_FIELDS
            if cfg.launcher.backend != "ray" and getattr(cfg.launcher, name) != getattr(defaults, name)]


_RAY_FIELDS = ("ray_address", "ray_resources", "ray_placement_timeout_seconds")


def given_ray_field_problems(cfg: DeploymentConfig) -> list[Problem]:
    """ray_field_problems for a ray field given at its default (`--ray-address auto` is how a ray deployment is typed:
    with --backend ray forgotten, every instance started on this machine without a word). Given is the model's
    fields_set, right only for a config read from the user's file and flags (config/loader.py): one read back from
    JSON (a slurm node step's) has every field set."""
    defaults = LauncherConfig()
    return [_ray_only(cfg, name) for name in _RAY_FIELDS
            if cfg.launcher.backend != "ray" and name in cfg.launcher.model_fields_set
            and getattr(cfg.launcher, name) == getattr(defaults, name)]


def _ray_only(cfg: DeploymentConfig, name: str) -> Problem:
    return problem(f"launcher.{name}", f"is only read by --backend ray (the backend is {cfg.launcher.backend})",
                   "add --backend ray (launcher.backend: ray), or remove it")


def node_problems(cfg: DeploymentConfig) -> list[Problem]:
    """node_rank and every group's node index point into parallel.nodes (or are 0 without nodes)."""
    problems: list[Problem] = []
    n_nodes = max(1, len(cfg.parallel.nodes))
    if cfg.parallel.node_rank >= n_nodes:
        problems.append(problem("parallel.node_rank", f"{cfg.parallel.node_rank} is not below the node count {n_nodes}",
                                f"use --node-rank 0..{n_nodes - 1}, or list the nodes under parallel.nodes"))
    needed = 1 + max((group.node for group in cfg.instances), default=0)
    for i, group in enumerate(cfg.instances):
        if group.node < n_nodes:
            continue
        if cfg.launcher.backend == "slurm":  # the nodes are the allocation's: the user wrote no parallel.nodes
            plural = "node" if n_nodes == 1 else "nodes"
            problems.append(problem(f"instances[{i}].node", f"node {group.node} is not in the SLURM allocation, "
                                    f"which has {n_nodes} {plural}", f"allocate {needed} nodes (sbatch/salloc "
                                    f"--nodes {needed}), or set node: {'0' if n_nodes == 1 else f'0..{n_nodes - 1}'}"))
        else:
            problems.append(problem(f"instances[{i}].node", f"node {group.node} does not exist ({n_nodes} node(s))",
                                    "use an index into parallel.nodes"))
    addresses = [node.address for node in cfg.parallel.nodes]
    for k, address in enumerate(addresses):
        if address in addresses[:k]:
            problems.append(problem(f"parallel.nodes[{k}].address", f"{address!r} is listed twice",
                                    "give each node its own address"))
    reach = side_channel_reach_problem(cfg)
    if reach is not None:
        problems.append(reach)
    problems += _spanning_problems(cfg)
    return problems


def _spanning_problems(cfg: DeploymentConfig) -> list[Problem]:
    """A TP group larger than its node's listed devices, listing none of its own, spans the next nodes
    (config/placement.py spans_nodes, as the launcher places it): every node must then know the rendezvous port, and
    each rank's side channel must be reachable."""
    problems: list[Problem] = []
    nodes = cfg.parallel.nodes
    for i, group in enumerate(cfg.instances):
        if not spans_nodes(cfg, group):
            continue
        if cfg.parallel.master_port is None:
            problems.append(problem("parallel.master_port", f"instances[{i}] has TP {group.tp} but node {group.node} "
                                    f"lists {len(nodes[group.node].devices)} device(s), so its TP group spans nodes "
                                    "and every node must know the rendezvous port", "set parallel.master_port "
                                    "(e.g. 29500)"))
        if spanning_side_channel_unreachable(cfg, group.role):
            problems.append(problem("kv_transfer.side_channel_host", f"instances[{i}]'s TP group spans nodes, but "
                                    f"the KV side channel binds {cfg.kv_transfer.side_channel_host}",
                                    "set it to 0.0.0.0 so each rank advertises its own node's address"))
    return problems


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def spanning_side_channel_unreachable(cfg: DeploymentConfig, role: str) -> bool:
    """Whether a TP group of `role` spanning nodes has ranks whose KV side channel the other nodes cannot reach: a
    prefill or decode group whose connector opens one (nixl, mooncake; storage moves KV through files) bound to a
    loopback address. check-config (_spanning_problems) and the launcher's plan (launcher/plan.py) both ask this."""
    return role != "colocated" and not cfg.colocated and cfg.kv_transfer.connector in ("nixl", "mooncake") \
        and cfg.kv_transfer.side_channel_host in LOOPBACK_HOSTS


def side_channel_reach_problem(cfg: DeploymentConfig) -> Problem | None:
    """Prefill and decode on different nodes need a KV side channel the other node can reach."""
    if cfg.colocated or cfg.kv_transfer.connector not in ("nixl", "mooncake") \
            or cfg.kv_transfer.side_channel_host not in LOOPBACK_HOSTS:
        return None
    prefill_nodes = {g.node for g in cfg.instances if g.role == "prefill" and g.count > 0}
    decode_nodes = {g.node for g in cfg.instances if g.role == "decode" and g.count > 0}
    if all(d == p for d in decode_nodes for p in prefill_nodes):
        return None
    return problem("kv_transfer.side_channel_host",
                   f"the KV side channel binds {cfg.kv_transfer.side_channel_host}, which decode instances on "
                   "other nodes cannot reach", "set it to 0.0.0.0: each prefill instance then advertises its "
                   "node's address")


def tp_problems(cfg: DeploymentConfig, info: ModelInfo, rule: TPRule | None = None) -> list[Problem]:
    """Each group's TP size splits the model (model/tp_split.py: the heads, the MLP and expert widths, the experts
    under expert parallel) and passes the checkpoint's `rule` (a block-FP8 one's 128 edges: checkpoint.py
    `block_fp8_tp_rule`), every problem named, as the load refuses them; P and D TP sizes divide one another (and,
    when they differ, KV moves by pull: kv_transfer/reshard.py)."""
    sources = tp_sources(cfg)
    problems = by_source(cfg, [GroupFinding(i, sources[i], found.message, found.hint)
                               for i, group in enumerate(cfg.instances)
                               for found in split_problems(info, group.tp or 1,
                                                           group_expert_parallel(cfg.parallel, group), rule)],
                         sources)
    prefill = {g.tp or 1 for g in cfg.instances if g.role == "prefill" and g.count > 0}
    decode = {g.tp or 1 for g in cfg.instances if g.role == "decode" and g.count > 0}
    for p_tp in sorted(prefill):
        for d_tp in sorted(decode):
            if p_tp % d_tp and d_tp % p_tp:
                problems.append(problem("parallel.decode_tp", f"prefill TP {p_tp} and decode TP {d_tp} do not divide "
                                        "each other, so KV heads cannot be mapped between them",
                                        "use the same TP size for prefill and decode (--tp N)"))
            elif p_tp != d_tp and cfg.kv_transfer.transfer_mode == "push":
                # Resharding reads whole prefill blocks and slices them on the decode side (pull only).
                problems.append(problem("kv_transfer.transfer_mode", f"prefill TP {p_tp} and decode TP {d_tp} "
                                        "differ, and KV transfer between different TP sizes is pull only",
                                        "use --transfer-mode pull or auto (CPU, or GPUs joined by NVLink), "
                                        "or the same TP size for prefill and decode"))
    return problems


def cache_problems(cfg: DeploymentConfig, info: ModelInfo | None) -> list[Problem]:
    """Block size, max_model_len vs the model's positions, num_gpu_blocks vs one full-length sequence."""
    problems: list[Problem] = []
    block_size = cfg.cache.block_size
    if block_size not in BLOCK_SIZES:
        problems.append(problem("cache.block_size", f"{block_size} is not a supported block size",
                                "use one of " + ", ".join(map(str, BLOCK_SIZES))))
    max_len = cfg.model.max_model_len
    if info is not None and info.max_position_embeddings is not None and max_len is not None:
        if max_len > info.max_position_embeddings:
            problems.append(problem("model.max_model_len",
                                    f"{max_len} exceeds the model's max_position_embeddings "
                                    f"{info.max_position_embeddings}",
                                    f"use --max-model-len {info.max_position_embeddings} or less"))
    # info.max_position_embeddings None: config.json's is invalid, which checkpoint_problems names with its key (an
    # absent one reads as the family's default, as the loader reads it)
    blocks = cfg.cache.num_gpu_blocks
    if blocks is not None and max_len is not None and block_size in BLOCK_SIZES:
        needed = -(-max_len // block_size)
        if blocks < needed:
            problems.append(problem("cache.num_gpu_blocks", f"{blocks} blocks of {block_size} tokens cannot hold one "
                                    f"{max_len}-token sequence ({needed} blocks)",
                                    f"use at least {needed} blocks or a smaller --max-model-len"))
    return problems



def tp_support_problems(cfg: DeploymentConfig) -> list[Problem]:
    """What an instance of TP > 1 refuses at start (distributed/executor.py), refused here first: sleep mode, and the
    storage connector on prefill and decode instances (colocated ones move no KV). One problem each, naming the
    groups."""
    spanning = [(i, g) for i, g in enumerate(cfg.instances) if (g.tp or 1) > 1 and g.count > 0]
    moving = [(i, g) for i, g in spanning if g.role != "colocated"]

    def named(groups: list[tuple[int, InstanceGroupConfig]]) -> str:
        return ", ".join(f"instances[{i}] ({g.role}, TP {g.tp})" for i, g in groups)

    problems: list[Problem] = []
    if cfg.model.enable_sleep_mode and spanning:
        problems.append(problem("model.enable_sleep_mode", f"sleep mode is not supported with TP > 1 yet: "
                                f"{named(spanning)}", "run sleep mode with --tp 1"))
    if cfg.kv_transfer.connector == "storage" and moving:
        problems.append(problem("kv_transfer.connector", f"the storage connector does not run with TP > 1 yet: "
                                f"{named(moving)}", "use --kv-connector nixl or mooncake with TP > 1"))
    return problems
