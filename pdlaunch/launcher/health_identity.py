"""Whose /health answers at a child's address: the child's own, or another server's that took the port (another
deployment's proxy or instance, any service with a /health). An instance's names its engine_id, the proxy's lists
the deployment's instances, and an instance another node runs names its role and an engine_id that node's launcher
gives it."""

from __future__ import annotations

import httpx

from pdlaunch.config.engine_ids import is_engine_of_named
from pdlaunch.launcher.plan import DeploymentPlan, InstancePlan


def lists_instances(response: httpx.Response, plan: DeploymentPlan) -> bool:
    """Whether a /health answer at the proxy's address lists every instance of `plan`."""
    return {p.url for p in plan.instances} <= _listed_states(response).keys()


def not_seen_ready(response: httpx.Response, plan: DeploymentPlan) -> list[str]:
    """The instances of `plan` that a proxy's /health answer does not list as ready, each as "<name> <state>". The
    proxy probes each instance on its own schedule: it may answer 200 (every role has a ready instance) a moment before
    it has seen the last one the launcher found ready, which would get no request until then."""
    states = _listed_states(response)
    return [f"{p.spec.name} {states.get(p.url) or 'unlisted'}" for p in plan.instances if states.get(p.url) != "ready"]


def _listed_states(response: httpx.Response) -> dict[object, object]:
    """url -> state of each instance a proxy's /health answer lists (empty for an answer of another shape)."""
    body = json_object(response)
    listed = body.get("instances") if body is not None else None
    return {i.get("url"): i.get("state") for i in listed if isinstance(i, dict)} if isinstance(listed, list) else {}


def names_engine_id(response: httpx.Response, engine_id: str | None) -> bool:
    """Whether a /health answer names `engine_id` (the one planned for the instance at that address)."""
    body = json_object(response)
    if body is None:
        return False
    return body.get("engine_id") == engine_id


def is_remote_instance(plan: InstancePlan, response: httpx.Response, shared_base: str | None) -> bool:
    """Whether a /health answer names the role of `plan` and an engine_id another node's launcher gives it."""
    body = json_object(response)
    if body is None or body.get("role") != plan.spec.role:
        return False
    return is_engine_of_named(body.get("engine_id"), plan.spec.name, shared_base)


def remote_identity(plan: InstancePlan, shared_base: str | None) -> str:
    """What `is_remote_instance` expects, for messages. Each node's launcher names an instance's engine_id
    "<base>-<name>", and "<base>-<name>-rN" after its N-th restart; the base is known here only when the
    config sets kv_transfer.engine_id (every node reads it), else each node draws its own."""
    name = plan.spec.name
    engine_id = (f"engine_id {shared_base}-{name}" if shared_base is not None
                 else f"an engine_id ending in -{name}")
    return f"role {plan.spec.role} and {engine_id} (or that with -rN after a restart)"


def json_object(response: httpx.Response) -> dict[str, object] | None:
    """A /health body as a JSON object; None for any other answer (not JSON, not even text, not an object)."""
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None
