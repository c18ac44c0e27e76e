"""Answers of other processes read whole, bounded in time and in size (the proxy's calls to its instances, the
launcher's to the instances it supervises).

httpx's timeouts bound each read, not an answer: one that trickles in (a byte before each read times out) never
ends, and one without end fills the caller's memory. These read under a deadline for the whole answer and stop at a
byte limit; the caller says what either means for the instance.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import httpx


class AnswerTooLarge(Exception):
    """An answer passed the byte limit of its kind."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"an answer of more than {limit} bytes")
        self.limit = limit


async def read_body(response: httpx.Response, max_bytes: int) -> bytes:
    """The body of an open streamed answer; AnswerTooLarge as soon as it passes `max_bytes` (the rest is not read:
    the caller closes the response)."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise AnswerTooLarge(max_bytes)
    return bytes(body)


async def fetch(client: httpx.AsyncClient, method: str, url: str, *, timeout_s: float, max_bytes: int,
                headers: dict[str, str] | None = None, content: bytes | None = None,
                params: Mapping[str, str] | None = None, connect_timeout_s: float | None = None) -> tuple[int, bytes]:
    """(status, body) of one call. TimeoutError when the whole answer took longer than `timeout_s`, httpx's
    ConnectTimeout / ReadTimeout when a step did, AnswerTooLarge, or another httpx.HTTPError."""
    timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s if connect_timeout_s is not None else timeout_s)
    async with asyncio.timeout(timeout_s):
        async with client.stream(method, url, headers=headers, content=content, params=params,
                                 timeout=timeout) as response:
            return response.status_code, await read_body(response, max_bytes)
