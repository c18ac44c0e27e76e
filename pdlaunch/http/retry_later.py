"""The 503s that mean "try again soon" carry `Retry-After` (whole seconds), which the openai client and most HTTP
clients wait for before their retry (the openai client: a value of 60 s or less, in place of its own backoff).

Which 503s do, and why these values:
- an instance past its pending-request limit (`overloaded`): 1 s. A pending request ends within a few engine steps
  (milliseconds to a second), and the client's own backoff grows from there after each further 503.
- the proxy with no ready instance of a role (`no_instance`, proxy/instances.py): when the soonest of them should be
  ready again (proxy/unready.py). That is a restart under way: the launcher's backoff (supervision.
  restart_backoff_seconds, which it passes as the proxy's --restart-backoff) and then the engine's load, as long as
  the proxy saw that instance's last restart take; a retry sooner only meets the same 503. None while every one
  of them is asleep (a wait does not end that).
- the proxy refused by an instance it picked (`instance_unreachable`, proxy/translate.py): 1 s. The proxy marked it
  down, so the retry goes to another ready instance or gets `no_instance`, which carries its own wait.
- an instance's 503 that the proxy passes on keeps the instance's `Retry-After` (`retry_after_of`).
- `shutting_down` for a request the drain at shutdown cut, the proxy's and an instance's (http/shutdown_answer.py):
  1 s. The retry goes to a running server: another replica behind the load balancer, another instance of the role
  (through the proxy), or this one once restarted.
- an instance's `shutting_down` for a request its engine's stop cut (server/engine_thread.py): 1 s, as the proxy's.
  The engine stops once the instance's drain has run out; the proxy sends the retry to another instance.

Not the ones a wait does not end: `sleeping` (until someone POSTs /wake_up), `not_ready` (loading, failed or
stopped: the proxy routes nothing to such an instance), nor the engine call past its timeout (an operator's /sleep,
/wake_up, ...).
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi.responses import JSONResponse

from pdlaunch.http.errors import OpenAIError

RETRY_AFTER = "Retry-After"
OVERLOADED_RETRY_AFTER_S = 1
UNREACHABLE_RETRY_AFTER_S = 1
# An instance's value past this is not passed on (another server's, or a mistake): clients would wait that long.
MAX_RETRY_AFTER_S = 3600


class RetryLater(OpenAIError):
    """A 503 whose answer carries `Retry-After: retry_after_s` (an integer, at least 1)."""

    def __init__(self, message: str, code: str, retry_after_s: int) -> None:
        if not 1 <= retry_after_s <= MAX_RETRY_AFTER_S:
            raise ValueError(f"Retry-After must be 1..{MAX_RETRY_AFTER_S} seconds, not {retry_after_s}")
        super().__init__(503, message, code=code)
        self.retry_after_s = retry_after_s

    def response(self) -> JSONResponse:
        response = super().response()
        response.headers[RETRY_AFTER] = str(self.retry_after_s)
        return response


def retry_after_of(headers: Mapping[str, str]) -> int | None:
    """An instance's `Retry-After` in seconds, when it is a whole number of them from 1 to MAX_RETRY_AFTER_S; else
    None (the HTTP-date form included: a pdlaunch instance sends seconds, and a clock in another process is not
    this one's)."""
    value = headers.get(RETRY_AFTER, "").strip()
    if not value.isascii() or not value.isdigit() or len(value) > 6:
        return None
    seconds = int(value)
    return seconds if 1 <= seconds <= MAX_RETRY_AFTER_S else None
