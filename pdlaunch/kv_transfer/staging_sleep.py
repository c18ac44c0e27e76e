"""What NixlConnector.before_sleep needs from the agent and the two sides without changing them.

Sleep mode frees the staging buffer (staging.py) with the rest of the engine's device memory: the NIXL
registration of it must go first, and a buffer whose slots a transfer still holds must not go at all.
These helpers read the prefill/decode sides' bookkeeping under their own locks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pdlaunch.kv_transfer.agent import KVAgent
    from pdlaunch.kv_transfer.nixl_receiver import DecodeSide
    from pdlaunch.kv_transfer.nixl_sender import PrefillSide


def staging_users(sender: PrefillSide | None, receiver: DecodeSide | None) -> set[str]:
    """Request ids whose transfers may hold staging slots now: on prefill, stagings not yet unstaged
    and holds a push or staging copy is reading; on decode, loads still running or draining."""
    users: set[str] = set()
    if sender is not None:
        with sender._lock:
            users |= {t.request_id for t in sender._tickets.values()}
            users |= {h.request_id for h in sender._holds.values() if h.busy}
    if receiver is not None:
        with receiver._lock:
            users |= set(receiver._loads) | set(receiver._draining)
    return users


def deregister_kv_memory(agent: KVAgent) -> None:
    """Deregister what `agent.register` registered (the KV caches or the staging buffer), so that the
    memory can be freed; `agent.reregister` registers the new memory after the wake-up."""
    if agent._registered is not None:
        agent.nixl.deregister_memory(agent._registered)
        agent._registered = None
