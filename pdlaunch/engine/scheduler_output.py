"""What one step computes: each scheduled request's range of positions (the scheduler's output)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdlaunch.engine.request import Request


@dataclass
class ScheduledRequest:
    request: Request
    start: int  # first position computed this step (== num_computed_tokens when scheduled)
    num_new_tokens: int
    # The step feeds the request's last known token, so its logits give the next one.
    needs_sample: bool = field(init=False)

    def __post_init__(self) -> None:
        self.needs_sample = self.end == self.request.num_tokens

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)
