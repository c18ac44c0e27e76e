"""Who may call what, at the proxy and at every instance (docs/ARCHITECTURE.md "Trust boundaries").

- `/health` is always open (the launcher and load balancers probe it).
- With an API key (`security.api_key`, `--api-key`, PDLAUNCH_API_KEY), every other route needs
  `Authorization: Bearer KEY` or the deployment's internal token; else 401 in OpenAI's shape
  (`invalid_request_error` / `invalid_api_key`).
- Without an API key, the OpenAI routes, /info and /metrics stay open as before, but the control
  routes (/sleep, /wake_up, /is_sleeping) answer 403 unless the caller has the internal token: nobody
  can put a deployment to sleep anonymously. Set an API key to use them.
- `/internal/...` routes (e.g. releasing held KV) take only the internal token, never the client key.

The internal token is HMAC-SHA256(deployment_secret, INTERNAL_LABEL): the proxy and the launcher
send it in INTERNAL_TOKEN_HEADER; the secret itself never travels. Comparisons are constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from pdlaunch.http.asgi import HTTPMiddleware
from pdlaunch.http.errors import OpenAIError

INTERNAL_TOKEN_HEADER = "X-Pdlaunch-Internal-Token"
INTERNAL_LABEL = b"pdlaunch-internal-http-v1"
OPEN_PATHS = frozenset({"/health"})
CONTROL_PATHS = frozenset({"/sleep", "/wake_up", "/is_sleeping"})
INTERNAL_PREFIX = "/internal/"


def internal_token(deployment_secret: str) -> str:
    return hmac.new(deployment_secret.encode(), INTERNAL_LABEL, hashlib.sha256).hexdigest()


def internal_headers(deployment_secret: str | None) -> dict[str, str]:
    """Headers a deployment process sends to instances of its own deployment."""
    return {INTERNAL_TOKEN_HEADER: internal_token(deployment_secret)} if deployment_secret else {}


def _same(given: str | None, expected: str | None) -> bool:
    """Whether a header value (its bytes as sent, read as latin-1 by ASGI) is `expected`, in either encoding a
    client may send text in: UTF-8 (curl, a key typed in a UTF-8 terminal) or latin-1 (Python's http.client).
    Digests of equal length are compared, so that the time taken does not tell the key's length either."""
    if not given or not expected:
        return False
    try:
        sent = hashlib.sha256(given.encode("latin-1")).digest()
    except UnicodeEncodeError:  # not from a header: no byte string holds it
        return False
    encodings = [expected.encode()]
    if not expected.isascii() and all(ord(c) < 256 for c in expected):
        encodings.append(expected.encode("latin-1"))
    matches = [hmac.compare_digest(sent, hashlib.sha256(key).digest()) for key in encodings]  # each one compared
    return any(matches)


@dataclass(frozen=True)
class AccessPolicy:
    """The credentials one process accepts. Both None: only /health and the open OpenAI routes work."""

    api_key: str | None = None
    internal: str | None = None  # internal_token(deployment_secret)

    @classmethod
    def from_secrets(cls, api_key: str | None, deployment_secret: str | None) -> AccessPolicy:
        return cls(api_key or None, internal_token(deployment_secret) if deployment_secret else None)

    def is_internal(self, token: str | None) -> bool:
        """Whether an INTERNAL_TOKEN_HEADER value is this deployment's internal token."""
        return _same(token, self.internal)

    def check(self, path: str, authorization: str | None, token: str | None) -> OpenAIError | None:
        """None when the caller may use `path`, else the error to answer with."""
        if path in OPEN_PATHS:
            return None
        is_internal = self.is_internal(token)
        if path.startswith(INTERNAL_PREFIX):
            if is_internal:
                return None
            return OpenAIError(403, f"{path} is internal to the deployment (it needs the internal token that "
                                    "the proxy derives from security.deployment_secret)", code="internal_only")
        if is_internal:
            return None
        scheme, _, key = (authorization or "").partition(" ")
        has_key = scheme.lower() == "bearer" and _same(key.strip(), self.api_key)
        if self.api_key is not None:
            if has_key:
                return None
            if not authorization:
                message = "missing API key: send the header `Authorization: Bearer KEY`"
            elif scheme.lower() != "bearer":  # `Authorization: KEY` (or Basic): the key's scheme is missing
                message = "the Authorization header is not `Bearer KEY`: send `Authorization: Bearer KEY`"
            else:
                message = "invalid API key"
            return OpenAIError(401, f"{message} (the key is the deployment's --api-key / PDLAUNCH_API_KEY)",
                               code="invalid_api_key")
        if path in CONTROL_PATHS:
            return OpenAIError(403, f"{path} needs an API key: start the deployment with --api-key KEY (or "
                                    "PDLAUNCH_API_KEY) and send `Authorization: Bearer KEY`",
                               code="api_key_required")
        return None


class RequireAuth(HTTPMiddleware):
    """ASGI middleware applying an AccessPolicy before the request body is read."""

    def __init__(self, app: ASGIApp, policy: AccessPolicy) -> None:
        super().__init__(app)
        self.policy = policy

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        error = self.policy.check(scope.get("path", ""), headers.get("authorization"),
                                  headers.get(INTERNAL_TOKEN_HEADER.lower()))
        if error is None:
            await self.app(scope, receive, send)
            return
        response = error.response()
        if error.status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)
