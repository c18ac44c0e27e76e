"""Instance names: `<role>-<n>`, n counting the deployment's instances of that role across its `instances`
groups in config order. `[prefill, decode x2, decode]` names prefill-0, decode-0, decode-1, decode-2; a
deployment with one group per role keeps the names it always had (prefill-0, decode-0, decode-1, ...).

The name is what tells instances apart everywhere: its engine_id (`<kv_transfer.engine_id>-<name>`, which NIXL
handshakes and the proxy check), its log file (`<name>.log`), its status row, its Ray actors, the proxy's
instance names and metrics. So it counts across groups: two groups of one role numbered each from 0 would
give two instances one name. What belongs to a group (its HTTP port `base_port + k`, its `devices`) uses the
instance's place k in its group instead (config/port_plan.py).

Under `pdlaunch render kubernetes` an instance takes its leader pod's name instead (`<name>-<role>-<group>-<k>`,
InstanceSpec.pod, render/instance_groups.py), which the proxy shortens to `<role>-<group>-<k>`
(render/kubernetes.py): a pod's name is its LeaderWorkerSet's (one per group) and its replica's.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdlaunch.config.topology_config import InstanceGroupConfig


def instance_name(role: str, number: int) -> str:
    """The name of the `number`-th instance (from 0) of `role` in the deployment."""
    return f"{role}-{number}"


def role_numbers(groups: Sequence[InstanceGroupConfig]) -> list[range]:
    """numbers[g][k]: the number (`instance_name`'s) of instance k of groups[g], counted per role across the
    groups in order. Ranges, not lists: check-config prints the names of a count too large to run (10**20, refused
    with a problem) without making a number for each."""
    taken: dict[str, int] = {}  # role -> instances of it in the groups before
    numbers: list[range] = []
    for group in groups:
        first = taken.get(group.role, 0)
        numbers.append(range(first, first + group.count))
        taken[group.role] = first + group.count
    return numbers
