"""Async scheduling: the host prepares step N+1 while the device runs step N (as vLLM's async scheduling and
SGLang's overlap scheduler do), so the device does not wait for Python between steps.

A step whose sampling needs nothing of the host's per-token state (no logits processors, no grammar, no
logprobs: `deferrable`) leaves its sampled ids on the device (`InFlight`) and each sampled request counts one
pending token (`Request.num_pending`). The next step is scheduled and launched at once, its input row of a
pending token filled on the device from those ids (step_builder.py); only then does the host read the ids
(`read`), append them, detokenize and apply the stop rules. A request that turns out finished by then was
possibly scheduled again: that extra token is never sampled (its logits row is dropped) nor shown. A request
whose pending token is its last by max_tokens is not scheduled again at all (`Request.last_token_pending`).
A step that cannot be deferred samples after the previous step's tokens are read, exactly as without overlap.

Greedy and seeded tokens are those of one step at a time: every request's sampling sees the same logits and
draws from its own generator in the same order.

Scheduling the next step at once has a price for a request that arrives meanwhile; engine/arrival_window.py
lets the engine loop wait for arrivals while the device still has a step queued.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pdlaunch.engine.request import Request
from pdlaunch.engine.sampler import SampleRow


@dataclass
class InFlight:
    """The sampled ids of a launched step that the host has not read yet."""

    requests: list[Request]
    token_ids: torch.Tensor  # [N] long on the device: feeds the next step's inputs
    host_ids: torch.Tensor  # [N] long: the same, copied to the host without blocking
    ready: torch.cuda.Event | None  # recorded after that copy (None on CPU: already there)
    row_of: dict[str, int] = field(default_factory=dict)  # request id -> row of token_ids

    def done(self) -> bool | None:
        """Whether the device has finished the step (None on CPU: the host ran it)."""
        return self.ready.query() if self.ready is not None else None  # type: ignore[no-untyped-call]

    def read(self) -> list[int]:
        """The ids on the host (waits for the copy, hence for the step, not for anything launched after)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host_ids.tolist()


def in_flight(requests: list[Request], token_ids: torch.Tensor) -> InFlight:
    """Start copying a step's sampled ids to the host; each request gains a pending token."""
    if token_ids.device.type == "cuda":
        host = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
        host.copy_(token_ids, non_blocking=True)
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record()
        ready: torch.cuda.Event | None = event
    else:
        host, ready = token_ids, None
    for request in requests:
        request.num_pending += 1
    return InFlight(requests, token_ids, host, ready, {r.request_id: i for i, r in enumerate(requests)})


def deferrable(rows: Sequence[SampleRow]) -> bool:
    """Whether sampling these rows needs nothing the host learns from the step in flight (the output so far
    for penalties, min_tokens and bad_words; the grammar state) and nothing it must read back now (logprobs)."""
    return all(not r.params.processes_logits and r.matcher is None and r.params.logprobs is None for r in rows)
