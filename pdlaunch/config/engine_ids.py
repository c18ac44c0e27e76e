"""The engine_ids a launcher gives an instance, as its /health names them: "<base>-<name>" as planned
(launcher/plan.py; base is kv_transfer.engine_id), and that with "-rN" after its N-th restart (a new NIXL
agent: peers must not reuse what they cached for the old one). The launcher and the proxy check a /health
answer against them, to tell the instance from another server that took its address.
"""

from __future__ import annotations

import re

RESTARTED = r"(-r[1-9][0-9]*)?"  # "-rN" after the instance's N-th restart


def is_engine_of(engine_id: object, planned: str) -> bool:
    """Whether `engine_id` is `planned` or, after a restart, `planned`-rN."""
    return isinstance(engine_id, str) and re.fullmatch(re.escape(planned) + RESTARTED, engine_id) is not None


def is_engine_of_named(engine_id: object, name: str, base: str | None) -> bool:
    """Whether `engine_id` is one a launcher gives the instance `name`: "<base>-<name>" or that with -rN;
    any base when `base` is None (not shared: each node's launcher draws its own)."""
    if base is not None:
        return is_engine_of(engine_id, f"{base}-{name}")
    return isinstance(engine_id, str) and re.fullmatch(rf".+-{re.escape(name)}{RESTARTED}", engine_id) is not None
