"""One request's state inside the engine: tokens, progress, status."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from pdlaunch.engine.outputs import SamplingParams, TokenLogprob
from pdlaunch.kv_transfer.params import KVTransferParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued; may already hold blocks (after a remote KV load)
    WAITING_FOR_REMOTE_KVS = "waiting_for_remote_kvs"  # holds blocks, KV arriving through the connector
    RUNNING = "running"
    PREEMPTED = "preempted"  # blocks freed, queued again for recompute
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int  # monotonic admission counter: lower = older = higher priority
    kv_transfer_params: KVTransferParams | None = None  # parsed once, where the request entered the engine
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)  # prompt + output, kept in step
    status: RequestStatus = RequestStatus.WAITING
    # Tokens of all_token_ids whose KV is in the cache (computed here, prefix hit, or loaded).
    num_computed_tokens: int = 0
    # Sampled output tokens whose ids are still on the device (async scheduling, engine/async_step.py):
    # counted in num_tokens, not yet in output_token_ids / all_token_ids.
    num_pending: int = 0
    # Prompt tokens served from this instance's prefix cache (or CPU tier), set at first admission.
    num_cached_tokens: int = 0
    # Prompt tokens whose KV a connector loaded (from a prefill), set with num_cached_tokens.
    num_external_tokens: int = 0
    scheduled_at: float | None = None  # time.monotonic() at first admission (vLLM's prefill/inference times)
    num_preemptions: int = 0  # times the scheduler preempted it (vllm:request_num_preemptions)
    # Positions whose KV a preemption freed (the most it had): computing one of them again is a recompute.
    num_preempted_tokens: int = 0
    num_cached_tokens_set: bool = False
    # Its remote prefill's KV could not be loaded: the prompt was computed here instead (load_failure_policy
    # recompute), so num_cached_tokens is this instance's own prefix-cache hit, not the prefill's.
    prompt_recomputed: bool = False
    # The connector has been consulted for this request (done once, not again after preemption).
    connector_consulted: bool = False
    finish_reason: str | None = None
    # What stopped it, as vLLM's stop_reason: the stop_token_ids entry or the stop string (None: EOS, a length
    # limit, a completed grammar)
    stop_reason: int | str | None = None
    error: str | None = None
    error_status: int = 500
    error_param: str | None = None  # the request field `error` is about (an OpenAI error's `param`)
    generator: torch.Generator | None = None  # per-request RNG when params.seed is set
    # position -> logprob of the prompt token there, filled chunk by chunk (engine/prompt_logprobs.py)
    prompt_logprobs: dict[int, TokenLogprob] = field(default_factory=dict)
    prompt_logprobs_sent: bool = False

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and not self.prompt_logprobs_sent

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def last_token_pending(self) -> bool:
        """Its pending token ends it by max_tokens: nothing more to compute (async scheduling)."""
        return self.num_pending > 0 and len(self.output_token_ids) + self.num_pending >= self.params.max_tokens

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids) + list(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def finish(self, reason: str, error: str | None = None, error_status: int = 500,
               error_param: str | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.error = error
        self.error_status = error_status
        self.error_param = error_param
