"""The engine's requests: checked and queued (a PD decode continues from its prefill's first token), aborted,
the KV held for a decode leg released, and a dead peer engine's agents forgotten. `LLMEngine`
(engine/llm_engine.py) is built from this and `EngineStep` (engine/engine_step.py).
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import TYPE_CHECKING

from pdlaunch.engine.context_limit import TOO_LONG_HINT, too_long_message
from pdlaunch.engine.first_token import first_token_ids, first_token_logprob, skip_draws, skip_prefill_draw
from pdlaunch.engine.kv_capacity import KVCapacity, window_blocks
from pdlaunch.engine.logits_processors import check_in_vocab, check_token_ids
from pdlaunch.engine.outputs import InstanceAsleep, RequestOutput, SamplingParams
from pdlaunch.engine.request import Request
from pdlaunch.errors import EngineError, KVTransferError, PdlaunchError
from pdlaunch.kv_transfer.params import (
    EXPIRY_FIELD,
    JSONObject,
    KVTransferParams,
    PrefillAnswer,
    check_kv_transfer_params,
    params_expired,
)
from pdlaunch.kv_transfer.push_params import check_unsigned_push, is_unsigned_push
from pdlaunch.kv_transfer.push_params import client_request_id as client_request_id_of
from pdlaunch.metrics.kv_transfer import count_expired_recompute

if TYPE_CHECKING:  # llguidance is imported where a grammar is first needed
    import torch
    from llguidance import LLMatcher

    from pdlaunch.config.deployment_config import DeploymentConfig
    from pdlaunch.engine.output_processor import OutputProcessor
    from pdlaunch.engine.sampler import Sampler
    from pdlaunch.engine.scheduler import Scheduler
    from pdlaunch.engine.structured_output import StructuredOutput
    from pdlaunch.kv_transfer.base import KVConnector
    from pdlaunch.kvcache.block_manager import BlockManager
    from pdlaunch.runner.model_runner import ModelRunner

log = logging.getLogger("pdlaunch.engine.llm_engine")  # the engine's one logger name, across its files



class EngineRequests:
    # The engine's parts these methods read; LLMEngine.__init__ builds them.
    config: DeploymentConfig
    device: torch.device
    vocab_size: int
    max_model_len: int
    block_size: int
    _params_key: bytes | None
    _prefill_side_channels: frozenset[tuple[str, int]]
    runner: ModelRunner
    block_manager: BlockManager
    connector: KVConnector | None
    scheduler: Scheduler
    sampler: Sampler
    outputs: OutputProcessor
    _arrival: itertools.count[int]
    _admitted: list[tuple[Request, RequestOutput]]

    if TYPE_CHECKING:  # LLMEngine's (sleep mode)
        def is_sleeping(self) -> bool: ...

    def check_kv_transfer_params(self, raw: object) -> KVTransferParams | None:
        """The engine's boundary for kv_transfer_params: `raw` (the request's JSON) parsed once into its
        model (typed, bounded, and signed by a prefill of this deployment when it asks for a remote
        prefill), or KVTransferError naming the field. Thread-safe: the HTTP side calls it before the
        request reaches the engine thread; everything below takes the model. Params past their lease give None
        under the recompute policy (`params_expired`): counted as a recompute once the request is queued
        (`count_expired_recompute`), not here, where a refused request's params are parsed too."""
        max_blocks = -(-self.max_model_len // self.block_size) + 1
        if is_unsigned_push(raw):  # vLLM's push proxy: only to a prefill of this deployment (push_params.py)
            return check_unsigned_push(raw, self._prefill_side_channels)
        try:
            return check_kv_transfer_params(raw, self._params_key, max_blocks=max_blocks,
                                            lease_seconds=self.config.kv_transfer.kv_lease_seconds, now=time.time())
        except KVTransferError as exc:
            # Signed by our prefill but past its lease: the KV is gone, the prompt is not (recompute policy).
            expired = exc.field == f"kv_transfer_params.{EXPIRY_FIELD}" and exc.message.startswith("expired")
            if not expired or self.config.kv_transfer.load_failure_policy != "recompute":
                raise
            return None

    def grammar_matcher(self, spec: StructuredOutput) -> LLMatcher:
        """A new matcher of a structured-output request's grammar; any thread may build it (the server builds it
        off the engine thread and hands it to add_request). EngineError naming the field when it cannot be."""
        return self.outputs.grammar_matcher(spec)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    kv_transfer_params: KVTransferParams | JSONObject | None = None,
                    matcher: LLMatcher | None = None) -> None:
        """Queue a request. `kv_transfer_params`: the model `check_kv_transfer_params` parsed (the server
        parses them before it queues the request, and counts a recompute of expired ones), or the raw JSON object,
        parsed here (expired ones counted here). `matcher`: a new matcher of its structured output's grammar
        (grammar_matcher), else one is built here."""
        s = self.scheduler
        if self._in_use(request_id):
            raise EngineError(f"request id {request_id!r} is already in use", field="request_id",
                              hint="use a unique id per request")
        if self.is_sleeping():
            raise InstanceAsleep("the instance is sleeping", field="sleep", hint="POST /wake_up first")
        prompt = list(prompt_token_ids)
        kv = kv_transfer_params
        expired = False
        if isinstance(kv, dict):  # raw JSON (a direct engine user): parsed here, once
            raw, kv = kv, self.check_kv_transfer_params(kv)
            expired = params_expired(raw, kv)
        try:
            self._check_request(prompt, params, kv)
        except PdlaunchError:
            # The request itself is refused (a 400): its prefill's hold would wait for it until the lease's end. Not
            # so the two refusals above, of this instance's state: a request of that id here, which may be loading
            # the same params, and a sleep, after which a proxy may send the same leg to another decode.
            s.release_unloaded(request_id, prompt, kv)
            raise
        first = first_token_ids(kv)
        request = Request(request_id, prompt, params, next(self._arrival), kv)
        if params.seed is not None:
            request.generator = self.sampler.new_request_generator(params.seed)
            skip_draws(request, params.seed_offset, self.vocab_size, self.device)
        self.outputs.add(request, matcher)
        self.scheduler.add_request(request)
        if expired:
            count_expired_recompute(request_id)
        if first:
            try:
                continued = self._continue_from(request, first)
            except Exception:
                # Its first token's grammar or detokenizer raised: the caller gets the error as the request's
                # refusal, so nothing of it may stay here to run unseen and keep its id taken (a retry's 400).
                if not request.is_finished:
                    self.scheduler.finish_request(request, "abort")
                self.outputs.pop(request_id)
                raise
            self._admitted.append((request, continued))

    def release_unloaded(self, request_id: str, prompt_token_ids: list[int],
                         kv_transfer_params: KVTransferParams | None) -> None:
        """The server ended a PD decode request before add_request took it (its client left while its grammar was
        built or its add was queued, or its grammar was refused): its prefill is told to drop its hold now, not at
        its lease's end (scheduler.release_unloaded). Nothing while a request of that id is here: it may be loading
        the same params (add_request's rule)."""
        if not self._in_use(request_id):
            self.scheduler.release_unloaded(request_id, list(prompt_token_ids), kv_transfer_params)

    def _in_use(self, request_id: str) -> bool:
        s = self.scheduler
        return request_id in self.outputs.tracked or request_id in s.held or request_id in s.draining

    def _check_request(self, prompt: list[int], params: SamplingParams, kv: KVTransferParams | None) -> None:
        """EngineError naming the field when this engine refuses the request itself (its prompt, limits or ids)."""
        if not prompt:
            raise EngineError("the prompt is empty", field="prompt", hint="send at least one token")
        check_in_vocab(prompt, self.vocab_size, "prompt")
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:
            raise EngineError(
                too_long_message(len(prompt), params.max_tokens, self.max_model_len), field="prompt",
                hint=TOO_LONG_HINT)
        too_large = self.kv_capacity.refusal(total)  # it would preempt itself forever
        if too_large is not None:
            raise too_large
        check_token_ids(params, self.vocab_size)
        # A CPU generator skips them one draw at a time, here: bounded by max_model_len + the prompt's tokens. A
        # migration's continuation adds the g ids it carries to both (proxy/migrate.py), so an offset the client may
        # send stays one its continuation may send (a cap of max_model_len alone failed the continuation mid-stream).
        offset_cap = self.max_model_len + len(prompt)
        if params.seed_offset > offset_cap:
            raise EngineError(
                f"seed_offset {params.seed_offset} exceeds {offset_cap} (max_model_len {self.max_model_len} + the "
                f"prompt's {len(prompt)} tokens): no seeded request draws that many tokens before its prompt ends",
                field="seed_offset", hint=f"use at most {offset_cap}")
        check_in_vocab(first_token_ids(kv), self.vocab_size, "kv_transfer_params.first_token_ids")

    def _continue_from(self, request: Request, first: list[int]) -> RequestOutput:
        """Take the prefill's sampled token(s) as this request's first output (engine/first_token.py)."""
        assert isinstance(request.kv_transfer_params, PrefillAnswer)  # first_token_ids: signed prefill answers only
        text, reason, logprobs = "", None, []
        for token_id in first:
            skip_prefill_draw(request, self.vocab_size, self.device)
            appended = self.outputs.append_token(request, token_id)
            text += appended.text
            reason = appended.reason
            logprob = first_token_logprob(request.kv_transfer_params, token_id, request.params.logprobs)
            if logprob is not None:
                logprobs.append(logprob)
            if reason is not None:  # ended by its first token: the prompt's KV is never loaded
                self.scheduler.finish_request(request, reason, appended.error, appended.error_status,
                                              error_param=appended.error_param)
                break
        return self.outputs.output(request.request_id, list(request.output_token_ids), text, logprobs or None)

    @property
    def kv_capacity(self) -> KVCapacity:
        """What this engine's KV cache holds of one request (engine/kv_capacity.py); a PD decode reports it."""
        windows = [g.sliding_window for g in self.runner.groups]
        return KVCapacity(num_blocks=self.block_manager.num_blocks, block_size=self.block_size,
                          window_blocks=window_blocks(windows, self.block_size, self.scheduler.max_num_batched_tokens))

    @property
    def longest_request(self) -> int:
        """The most tokens (prompt and output) one request may reach: max_model_len, or fewer when a
        full-attention group's KV cache holds fewer (a request that fills the context asks for no more)."""
        return self.kv_capacity.longest(self.max_model_len)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is and free its blocks; None when it is not running here."""
        tracked = self.outputs.tracked.get(request_id)
        if tracked is None:
            return None
        self.scheduler.finish_request(tracked.request, "abort")
        return self.outputs.output(request_id, [], "")

    def release_held_kv(self, request_id: str) -> bool:
        """Prefill: free the blocks held for `request_id`'s decode leg now (it will not run); the next
        step frees them. False when nothing is held for it (never held, already sent or expired)."""
        if self.connector is None or request_id not in self.scheduler.held:
            return False
        return self.connector.release_held(request_id)

    def forget_engine(self, engine_id: str) -> int:
        """Another engine of the deployment died: its agents go from this engine's connector (every TP rank's),
        so that no mapping here keeps its memory allocated. Returns how many agents went (0 without a connector)."""
        return self.connector.forget_engine(engine_id) if self.connector is not None else 0

    def release_held_kv_of_client(self, client_request_id: str) -> int:
        """release_held_kv for every held request whose engine id names the client's X-Request-Id
        ("{client id}-{8 hex}"); returns how many were released."""
        held = [rid for rid in self.scheduler.held if client_request_id_of(rid) == client_request_id]
        return sum(self.release_held_kv(rid) for rid in held)
