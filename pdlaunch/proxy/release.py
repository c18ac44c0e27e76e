"""Tell a prefill to free the KV it holds for a decode leg that will not run.

After a prefill leg the prefill keeps the request's blocks for the decode side until the decode
reads them or kv_transfer.kv_lease_seconds pass. When the proxy knows the decode leg will not run or
not read them (the client went away, the decode refused the request, could not be reached, or failed
mid-stream), it calls the prefill's `POST /internal/kv/release` with the internal token, so the blocks
come back at once. A client that leaves while the prefill leg's answer is on its way leaves no params to
name: the proxy then names the leg's X-Request-Id (only one it made itself, so no other request shares it).
A prefill that a decode is reading from answers `released: false` and keeps them: nothing is freed
under a transfer. Fire and forget: the client's answer never waits for this.

At shutdown (`drain`) the proxy waits, at most RELEASE_TIMEOUT_S, for the releases in flight and for the requests
still open (`opened`): uvicorn cancels the requests its graceful timeout leaves and at once ends the lifespan, while
those requests unwind (their legs' connections closed first) and only then ask for their release; a drain of the
releases in flight alone returned before they asked, and their prefills kept the blocks until the lease.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import httpx

from pdlaunch.proxy.bodies import Body
from pdlaunch.proxy.instances import Instance
from pdlaunch.server.internal import KV_RELEASE_PATH

RELEASE_TIMEOUT_S = 5.0

log = logging.getLogger("pdlaunch.proxy")


class KVReleaser:
    def __init__(self, internal_headers: dict[str, str]) -> None:
        self._headers = internal_headers
        self._tasks: set[asyncio.Task[None]] = set()  # referenced until done, or the loop may drop them
        self._open = 0  # requests that may still ask for a release as they end (`opened`)
        self._changed = asyncio.Event()  # a request ended or a release began: what `drain` waits for
        self.client: httpx.AsyncClient | None = None

    @property
    def enabled(self) -> bool:
        """Without the deployment secret (a proxy in front of foreign instances) the leases free the KV."""
        return bool(self._headers)

    def opened(self) -> Callable[[], None]:
        """Count a request that may ask for releases until the returned callable runs (once; later calls do nothing):
        `drain` waits for it."""
        self._open += 1
        ended = False

        def end() -> None:
            nonlocal ended
            if not ended:
                ended = True
                self._open -= 1
                self._changed.set()

        return end

    def release_soon(self, prefill: Instance, kv_transfer_params: Body) -> None:
        request_id = kv_transfer_params.get("remote_request_id")
        if not self.enabled or not isinstance(request_id, str) or not request_id:
            return
        self._track(asyncio.ensure_future(self._release(prefill, request_id)))

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._changed.set()

    def release_client_soon(self, prefill: Instance, client_request_id: str) -> None:
        """The client left while `prefill` answered a prefill leg sent with X-Request-Id `client_request_id`
        (one the proxy made: unique): what it holds for that leg goes back, though the params never came."""
        if not self.enabled:
            return
        self._track(asyncio.ensure_future(self._release(prefill, client_request_id, "client_request_id")))

    async def _release(self, prefill: Instance, request_id: str, key: str = "request_id") -> None:
        if self.client is None:
            return
        try:
            response = await self.client.post(prefill.url + KV_RELEASE_PATH, json={key: request_id},
                                              headers=self._headers, timeout=RELEASE_TIMEOUT_S)
        except httpx.HTTPError as exc:
            log.warning("could not ask %s to release the KV of %s (its lease frees it): %s: %s",
                        prefill.name, request_id, type(exc).__name__, exc)
            return
        if response.status_code != 200:
            log.warning("%s refused to release the KV of %s (HTTP %d): %s", prefill.name, request_id,
                        response.status_code, response.text[:200])

    async def drain(self, timeout: float = RELEASE_TIMEOUT_S) -> None:
        """Wait for the releases in flight and the requests still open, and the releases those ask for as they end
        (at shutdown: module doc), at most `timeout` seconds."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        self._changed = asyncio.Event()  # one of this loop (an Event is bound to the loop that first waits on it)
        while self._tasks or (self._open and self.enabled):
            left = end - loop.time()
            if left <= 0:
                log.warning("shutting down with %d KV releases unsent or unanswered and %d requests open after %gs: "
                            "their prefills free the KV at the lease (kv_transfer.kv_lease_seconds)",
                            len(self._tasks), self._open, timeout)
                return
            self._changed.clear()
            changed = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait({changed, *self._tasks}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
