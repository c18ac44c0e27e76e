"""`proxy.workers: auto`: how many proxy processes share the port, from the CPUs the proxy may use where it runs.

One proxy worker costs latency long before it fills a core: each decode step releases one event per running
stream at once, and a new request's steps wait in the event loop behind that burst (README "Proxy workers": at
~2,100 events/s a single worker sat at 0.38 core yet added ~11 ms to each request; 4 workers: 4.8 ms, client
TTFT p50 32 -> 22 ms). A worker per 8 usable CPUs, 1 to 4: a small machine keeps its cores for the instances.

The proxy process resolves it itself (`python -m pdlaunch.proxy --workers auto`), so a Kubernetes pod counts its
own CPU limit, not the launcher's machine.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")  # this process's cgroup in each hierarchy
CPUS_PER_WORKER = 8
MAX_AUTO_WORKERS = 4
MAX_WORKERS = 64


class AutoWorkers(NamedTuple):
    workers: int
    usable_cpus: int
    why: str  # "auto: 32 usable CPUs", with the limit that bounds them when it is a quota

    def line(self) -> str:
        return f"{self.workers} worker{'s' if self.workers != 1 else ''} ({self.why})"


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> float | None:
    """The CPUs the CPU quota of this process's cgroup allows (a Kubernetes CPU limit), None without one: the
    smallest quota of its cgroup and each cgroup above it (a parent's bounds its children), as `self_cgroup`
    (/proc/self/cgroup) names it under `root` (the cgroup mount). cgroup v2 (`0::/PATH`): ROOT/PATH/cpu.max
    ("200000 100000": 2 CPUs; "max 100000": none); cgroup v1 (`N:cpu,cpuacct:/PATH`):
    ROOT/cpu,cpuacct/PATH/cpu.cfs_quota_us / cpu.cfs_period_us (-1: none), or ROOT/cpu/PATH. A cgroup not
    mounted where /proc names it (a container without its own cgroup namespace sees its own cgroup at the mount
    itself) is read at the mount; a file that is absent or unreadable counts as no quota, and an unreadable
    `self_cgroup` as the root cgroup."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        lines = ["0::/"]
    quotas: list[float] = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if not path.startswith("/"):
            continue
        if controllers == "":
            quotas += filter(None, (_v2_quota(cgroup) for cgroup in _up(root, path)))
        elif "cpu" in controllers.split(","):
            for mount in dict.fromkeys((root / controllers, root / "cpu,cpuacct", root / "cpu")):
                quotas += filter(None, (_v1_quota(cgroup) for cgroup in _up(mount, path)))
    return min(quotas, default=None)


def _up(mount: Path, path: str) -> list[Path]:
    """The cgroup `path` under `mount`, each cgroup above it, and the mount itself."""
    parts = [part for part in path.split("/") if part]
    return [mount.joinpath(*parts[:k]) for k in range(len(parts), -1, -1)]


def _v2_quota(cgroup: Path) -> float | None:
    try:
        fields = (cgroup / "cpu.max").read_text().split()
        return _ratio(fields[0], fields[1]) if len(fields) == 2 and fields[0] != "max" else None
    except (OSError, ValueError):
        return None


def _v1_quota(cgroup: Path) -> float | None:
    try:
        return _ratio((cgroup / "cpu.cfs_quota_us").read_text(), (cgroup / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None


def _ratio(quota: str, period: str) -> float | None:
    q, p = int(quota.strip()), int(period.strip())
    return q / p if q > 0 and p > 0 else None


def usable_cpus(affinity: int, quota: float | None) -> int:
    """The CPUs this process may run on (`affinity`) bounded by the cgroup quota (whole CPUs, at least 1)."""
    if quota is None:
        return max(1, affinity)
    return max(1, min(affinity, math.floor(quota)))


def auto_workers(affinity: int | None = None, quota: float | None = None, root: Path | None = CGROUP_ROOT,
                 self_cgroup: Path = SELF_CGROUP) -> AutoWorkers:
    """What `auto` resolves to here: clamp(usable CPUs // 8, 1, 4). `affinity` defaults to this process's
    os.sched_getaffinity; `quota` to its cgroup's (`self_cgroup`) under `root` (None root: no cgroup read)."""
    if affinity is None:
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if quota is None and root is not None:
        quota = cgroup_cpu_quota(root, self_cgroup)
    usable = usable_cpus(affinity, quota)
    workers = min(MAX_AUTO_WORKERS, max(1, usable // CPUS_PER_WORKER))
    bound = f", CPU quota {quota:g} of {affinity} CPUs" if quota is not None and quota < affinity else ""
    return AutoWorkers(workers, usable, f"auto: {usable} usable CPU{'s' if usable != 1 else ''}{bound}")


def workers_text(workers: int | str) -> str:
    """proxy.workers as the summaries show it: `3`, or `auto -> 1 here (auto: 2 usable CPUs)` (what auto resolves
    to on this machine; under Kubernetes or Ray the proxy counts its own where it runs)."""
    if workers != "auto":
        return str(workers)
    auto = auto_workers()
    return f"auto -> {auto.workers} here ({auto.why})"
