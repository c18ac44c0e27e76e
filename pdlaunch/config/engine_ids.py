"""The engine_ids a launcher gives an instance, as its /health names them: "<base>-<name>" as planned
(launcher/plan.py; base is kv_transfer.engine_id), and that with "-rN" after its N-th restart (a new NIXL
agent: peers must not reuse what they cached for the old one). The launcher and the proxy check a /health
answer against them, to tell the instance from another server that took its address.

A planned id may hold a part only the instance's start fills in, written `*` (one or more characters): a
Kubernetes pod's UID ("<base>-<pod name>-*", render/kubernetes.py), or the base another node's launcher
draws when the config sets none ("*-<name>").
"""

from __future__ import annotations

import re

RESTARTED = r"(-r[1-9][0-9]*)?"  # "-rN" after the instance's N-th restart
FILLED_IN = "*"  # in a planned engine_id: the part the instance's start fills in


def is_engine_of(engine_id: object, planned: str) -> bool:
    """Whether `engine_id` is `planned` or, after a restart, `planned`-rN; each `*` in `planned` stands for one
    or more characters."""
    pattern = ".+".join(re.escape(part) for part in planned.split(FILLED_IN)) + RESTARTED
    return isinstance(engine_id, str) and re.fullmatch(pattern, engine_id) is not None


def planned_engine_id(name: str, base: str | None) -> str:
    """The engine_id a launcher gives the instance `name`: "<base>-<name>"; any base ("*-<name>") when `base` is
    None (not shared: each node's launcher draws its own)."""
    return f"{FILLED_IN if base is None else base}-{name}"


def is_engine_of_named(engine_id: object, name: str, base: str | None) -> bool:
    """Whether `engine_id` is one a launcher gives the instance `name` (`planned_engine_id`), or that with -rN."""
    return is_engine_of(engine_id, planned_engine_id(name, base))
