"""Authentication of the KV plane with the deployment secret (`security.deployment_secret`).

Every instance, TP rank and the proxy of one deployment share the secret (the launcher makes it, or
the user gives it for multi-node). From it we derive one HMAC-SHA256 key per purpose, so that a MAC
made for one use is never accepted for another: a side-channel answer cannot be replayed as a
request, and neither can pass as signed kv_transfer_params.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass

from pydantic import JsonValue

from pdlaunch.errors import KVTransferError

PARAMS_PURPOSE = "pdlaunch kv_transfer_params v1"
REQUEST_PURPOSE = "pdlaunch side-channel request v1"
ANSWER_PURPOSE = "pdlaunch side-channel answer v1"
MAC_BYTES = 32  # SHA-256


def require_secret(secret: str | None, what: str) -> str:
    """The deployment secret, or a KVTransferError saying where it comes from."""
    if not secret:
        raise KVTransferError(
            f"{what} needs the deployment secret, and this instance has none",
            field="security.deployment_secret",
            hint="`pdlaunch serve` fills it in every instance's deployment file; when starting an instance "
            "by hand, set security.deployment_secret (16+ characters, the same on every instance)",
        )
    return secret


def derive_key(secret: str, purpose: str) -> bytes:
    return hmac.new(secret.encode(), purpose.encode(), hashlib.sha256).digest()


def mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def mac_ok(key: bytes, data: bytes, tag: bytes) -> bool:
    return hmac.compare_digest(mac(key, data), tag)


JSONObject = dict[str, JsonValue]  # a JSON object as json.loads gives it (params, side-channel bodies)


def canonical(obj: object) -> bytes:
    """One byte string per JSON value: sorted keys, no spaces, ASCII only. A proxy that parses and
    re-serializes the params (vLLM's toy proxies do) changes neither ints, strings nor lists."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


@dataclass(frozen=True)
class SideChannelKeys:
    """The keys of side-channel frames: requests and answers are MACed with different keys."""

    request: bytes
    answer: bytes

    @classmethod
    def from_secret(cls, secret: str) -> SideChannelKeys:
        return cls(derive_key(secret, REQUEST_PURPOSE), derive_key(secret, ANSWER_PURPOSE))


class RateLimitedWarning:
    """WARNING lines about refused peers, at most one per `interval` seconds per kind: a client that
    floods us with bad frames must not flood the log too. The next line says how many were skipped."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}
        self._lock = threading.Lock()

    def warn(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -self.interval) < self.interval:
                self._skipped[kind] = self._skipped.get(kind, 0) + 1
                return
            self._last[kind] = now
            skipped = self._skipped.pop(kind, 0)
        suffix = f" ({skipped} more like it in the last {self.interval:g}s not logged)" if skipped else ""
        self.logger.warning(message + suffix, *args)
