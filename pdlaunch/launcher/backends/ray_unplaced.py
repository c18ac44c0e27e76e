"""Why Ray has not placed an instance's placement group within launcher.ray_placement_timeout_seconds, said in the
resources the group asks for: each bundle against what the cluster has free now and in all, node by node.

check-config and serve refuse an instance that no set of live nodes could ever hold (config/ray_cluster.py), and a
deployment whose instances together never fit (config/ray_fit.py), so a group still waiting lacks free room: other
jobs hold it, or this deployment's own instances placed before it. Only the resources the group asks for are shown;
a node's memory and object store, in bytes, hid them."""

from __future__ import annotations

from types import ModuleType

from pdlaunch.config.ray_cluster import NODES_TIMEOUT_S, InstancePlacement, live_nodes
from pdlaunch.config.ray_thread import in_ray_thread
from pdlaunch.errors import PdlaunchError


def unplaced_message(ray: ModuleType, name: str, placement: InstancePlacement, timeout_s: float) -> str:
    """The error's text: what `name`'s group asks for, what is free now, what the cluster has in all."""
    asked = sorted(placement.bundles[0])
    nodes = live_nodes(ray)
    total = {k: sum(n.resources.get(k, 0.0) for n in nodes) for k in asked}
    late = PdlaunchError(f"the Ray cluster did not say its free resources within {NODES_TIMEOUT_S:.0f}s")
    try:
        available = in_ray_thread(ray, ray.available_resources, "reading the Ray cluster's free resources",
                                  NODES_TIMEOUT_S, late)
        free = f", and the cluster has {_fmt({k: float(available.get(k, 0.0)) for k in asked})} free now, of"
    except PdlaunchError:  # the head is slow to answer: say what it has in all
        free = ", and the cluster has"
    per_node = "; ".join(f"{n.address} {_fmt({k: n.resources.get(k, 0.0) for k in asked})}" for n in nodes)
    return (f"Ray could not place {name}'s placement group within {timeout_s:g}s: it asks for "
            f"{placement.describe()}{free} {_fmt(total)} in all (live nodes: {per_node})")


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"
