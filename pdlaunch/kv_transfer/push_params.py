"""Decode params from vLLM's push-mode proxy: the prefill's coordinates without its block ids.

vLLM's toy push proxy (tests/v1/kv_connector/nixl_integration/toy_push_proxy_server.py) gives the
decode only {do_remote_prefill, do_remote_decode, remote_engine_id, remote_request_id, remote_host,
remote_port, tp_size} out of the prefill's answer: no remote_block_ids, and so none of our signature
either. A decode takes such params (`params.UnsignedPush`) only under three rules that keep what signing
gives us:
- it connects only to a prefill side channel of this deployment: the launcher lists them in
  PREFILL_SIDE_CHANNELS_ENV; an address a client made up is refused before anything connects;
- it asks that prefill for the request's block ids over the authenticated side channel
  ("held_blocks"), naming the digest of its own prompt: the prefill answers only for a held request
  of the same prompt, so naming another user's request id gets nothing (nor its KV);
- remote_request_id may be left out (a proxy that sends both legs at once cannot know it): the
  prefill then matches the held request by the client's X-Request-Id, shared by both legs.
Such a decode leg may come before the prefill holds the request: the decode asks again, each ask waiting
at most decode/loads.py's HELD_BLOCKS_WAIT_SECONDS on the prefill, until its load's deadline; a client
that leaves meanwhile ends the asking within one wait and frees the loader thread for other loads, and the decode
tells the prefill what it asked for ("drop_held"): the hold of that request, made later, ends as it is made
(prefill/dropped_asks.py). A client that can name a held request (its id or X-Request-Id, and its prompt) could
take its KV with "held_blocks" already; "drop_held" lets it free that hold too, and no more.
"""

from __future__ import annotations

import hashlib
import os
import struct

from pydantic import ValidationError

from pdlaunch.errors import KVTransferError, error_text
from pdlaunch.kv_transfer.params import UnsignedPush

PREFILL_SIDE_CHANNELS_ENV = "PDLAUNCH_PREFILL_SIDE_CHANNELS"  # "host:port,host:port" (set by the launcher)


def is_unsigned_push(raw: object) -> bool:
    """Params asking for a remote prefill with neither our signature nor block ids (vLLM's push proxy)."""
    return (isinstance(raw, dict) and raw.get("do_remote_prefill") not in (None, False)
            and raw.get("signature") is None and raw.get("remote_block_ids") is None)


def prefill_side_channels(env: dict[str, str] | None = None) -> frozenset[tuple[str, int]]:
    """The deployment's prefill side channels this decode may connect to for unsigned push params."""
    value = (os.environ if env is None else env).get(PREFILL_SIDE_CHANNELS_ENV, "")
    out = set()
    for item in filter(None, (part.strip() for part in value.split(","))):
        host, _, port = item.rpartition(":")
        if host and port.isdigit():
            out.add((host.strip("[]"), int(port)))
    return frozenset(out)


def check_unsigned_push(raw: object, allowed: frozenset[tuple[str, int]]) -> UnsignedPush:
    """`raw` as a push registration (tp_size filled), or KVTransferError naming the field."""
    try:
        push = UnsignedPush.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        path = ".".join(str(p) for p in first["loc"])
        raise KVTransferError(error_text(first), field="kv_transfer_params" + (f".{path}" if path else ""),
                              hint="send the kv_transfer_params the prefill instance answered") from None
    if (push.remote_host, push.remote_port) not in allowed:
        raise KVTransferError(
            f"{push.remote_host}:{push.remote_port} is not a prefill side channel of this deployment",
            field="kv_transfer_params.remote_host",
            hint="params without remote_block_ids must name a prefill instance of this deployment "
                 "(as its answer did); or send the prefill's answer unchanged")
    return push.model_copy(update={"tp_size": push.tp_size or 1})


def prompt_digest(prompt_token_ids: list[int]) -> str:
    """What binds a decode's block-id request to the held request of the same prompt. The prefill
    computes it on its engine thread for every request it holds: the ids hash packed as 64-bit
    integers (~0.1 ms for 8k tokens on a slow core; their decimal text took ~0.9 ms)."""
    return hashlib.sha256(struct.pack(f"<{len(prompt_token_ids)}q", *prompt_token_ids)).hexdigest()


def client_request_id(engine_request_id: str) -> str:
    """The client's X-Request-Id inside an instance's engine request id ("{client id}-{8 hex}")."""
    return engine_request_id.rsplit("-", 1)[0]
