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

Scheduling the next step at once has a price for a request that arrives meanwhile: step N+1 is already queued
behind step N when it comes, so it joins N+2 and waits a whole step more than without overlap. `ArrivalWindow`
lets the engine loop wait for new requests while the device still has work queued: from the moment the host
read step N's tokens (the device then started N+1) until the recent decode step's length, less twice the host's
recent time to schedule and launch a step and a safety margin, has passed. A request that comes in that window
is scheduled at once into the next step; with none, the next step is launched at the window's end, still before
the device runs dry.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
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


WINDOW_SAFETY_S = 0.001  # the window ends this long before the launch must start, on top of twice its usual time
PREP_WEIGHT = 0.1  # weight of the newest step in the recent time to schedule and launch a step
# A/B switch while it is measured (RESULTS.md forty-eighth session): "off" schedules the next step at once
WINDOW_ON = os.environ.get("PDLAUNCH_ARRIVAL_WINDOW", "on") != "off"


class ArrivalWindow:
    """How long the engine loop may wait for new requests before it schedules the next step (the module doc):
    `stepping` at a step's start, `launched` once its forward is queued, `read` when the previous step's tokens
    are on the host, `seconds(step_s)` with the recent decode step's device time."""

    def __init__(self, now: Callable[[], float] = time.perf_counter) -> None:
        self._now = now
        self.prep_s: float | None = None  # recent host time from a step's start to its forward queued
        self.read_at: float | None = None  # when the host last read a step's tokens

    def stepping(self) -> float:
        return self._now()

    def launched(self, started: float) -> None:
        prep = self._now() - started
        self.prep_s = prep if self.prep_s is None else (1 - PREP_WEIGHT) * self.prep_s + PREP_WEIGHT * prep

    def read(self) -> None:
        self.read_at = self._now()

    def seconds(self, step_s: float | None) -> float:
        """0 until a step was read, timed and launched; else what is left of the window."""
        if not WINDOW_ON or step_s is None or self.prep_s is None or self.read_at is None:
            return 0.0
        return max(0.0, self.read_at + step_s - 2 * self.prep_s - WINDOW_SAFETY_S - self._now())
