"""The engine of one instance: requests in, RequestOutputs out, one `step()` at a time.

A step polls the KV connector, schedules, runs the model, samples, detokenizes, applies the stop
rules and frees what finished. With async scheduling (engine/async_step.py, the default with CUDA) a step launches
its forward before it reads the previous step's sampled tokens, so its outputs are those of the previous
step. Not thread-safe: the server drives it from one engine thread.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import TYPE_CHECKING

import torch

from pdlaunch import metrics
from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec, instance_cache
from pdlaunch.distributed.executor import create_executor
from pdlaunch.distributed.rank import kv_cache_spec
from pdlaunch.engine.async_step import InFlight, deferrable, in_flight
from pdlaunch.engine.context_limit import too_long_message
from pdlaunch.engine.first_token import (
    first_token_ids,
    first_token_logprob,
    skip_draws,
    skip_prefill_draw,
    with_first_token,
)
from pdlaunch.engine.logits_processors import check_in_vocab, check_token_ids
from pdlaunch.engine.output_processor import OutputProcessor
from pdlaunch.engine.outputs import InstanceAsleep, RequestOutput, SamplingParams, TokenLogprob
from pdlaunch.engine.prompt_logprobs import distribute as distribute_prompt_logprobs
from pdlaunch.engine.prompt_logprobs import take as take_prompt_logprobs
from pdlaunch.engine.request import Request, RequestStatus
from pdlaunch.engine.sampler import NO_TOKEN, Sampler
from pdlaunch.engine.scheduler import Scheduler
from pdlaunch.engine.sleep_mode import EngineSleep
from pdlaunch.engine.stats import EngineStats, engine_stats, update_metrics
from pdlaunch.engine.step_builder import build_step_inputs
from pdlaunch.engine.step_clock import step_clock
from pdlaunch.engine.structured_output import StructuredOutput, grammar_backend
from pdlaunch.errors import EngineError, KVTransferError
from pdlaunch.kv_transfer.base import KVCacheSpec, KVConnector
from pdlaunch.kv_transfer.params import (
    EXPIRY_FIELD,
    JSONObject,
    KVTransferParams,
    PrefillAnswer,
    answer_json,
    check_kv_transfer_params,
    params_key,
    sign_kv_transfer_params,
)
from pdlaunch.kv_transfer.push_params import check_unsigned_push, is_unsigned_push, prefill_side_channels
from pdlaunch.kv_transfer.push_params import client_request_id as client_request_id_of
from pdlaunch.kvcache.block_manager import BlockIntegrityError, BlockManager
from pdlaunch.memory.heap import freeze_startup_heap, thaw_heap
from pdlaunch.memory.platform import current_device_index, resolve_device, set_device, to_device_async
from pdlaunch.memory.sleep import SleepResult, WakeResult
from pdlaunch.model.loader import load_checkpoint, resolve_dtype, weight_dtype_name
from pdlaunch.offload.manager import OffloadManager

if TYPE_CHECKING:  # llguidance is imported where a grammar is first needed
    from llguidance import LLMatcher

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: DeploymentConfig, instance: InstanceSpec | None = None,
                 connector: KVConnector | None = None) -> None:
        self.config = config
        self.instance = instance
        self.role = instance.role if instance is not None else "colocated"
        self.engine_id = instance.engine_id if instance is not None else config.kv_transfer.engine_id
        self.device = self._bind_device(resolve_device(instance.device if instance is not None else config.device))
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        torch.manual_seed(config.model.seed)

        self.checkpoint = load_checkpoint(config.model.path, config.model.quantization)
        self.tokenizer = self.checkpoint.tokenizer
        if config.model.chat_template is not None:
            self.tokenizer.override_chat_template(config.model.chat_template)
        arch = self.checkpoint.arch
        self.vocab_size = arch.vocab_size
        self.max_model_len = self._max_model_len()
        self.block_size = config.cache.block_size
        secret = config.security.deployment_secret
        self._params_key = params_key(secret) if secret else None  # signs and checks kv_transfer_params
        self._prefill_side_channels = prefill_side_channels()  # where unsigned push params may point
        self.tp_size = instance.tp if instance is not None else config.parallel.tp
        # tp > 1: this process becomes TP rank 0 and spawns the other ranks (pdlaunch.distributed).
        self.executor = create_executor(config, instance, self.checkpoint, self.device, self.dtype,
                                        self.max_model_len, self.engine_id)
        self.engine_id = self.executor.engine_id  # rank 0's, adopted by every rank (vLLM #39907)
        self.runner = self.executor.runner
        groups = self.runner.groups
        self.block_manager = BlockManager(self.runner.num_blocks, self.block_size,
                                          [g.sliding_window for g in groups], config.cache.enable_prefix_caching)
        if connector is None and instance is not None and self.role in ("prefill", "decode"):
            connector = self._create_connector(config, instance)
        if connector is not None:
            connector = self.executor.wrap_connector(connector)  # tp > 1: mirrored to every rank's own
        self.connector = connector
        if connector is not None:
            connector.register_kv_caches(self.kv_cache_spec())
        self.offload = self._create_offload(config)
        self.scheduler = Scheduler(self.block_manager, config.scheduler.max_num_seqs,
                                   config.scheduler.token_budget(self.role), connector, self.offload,
                                   recompute_failed_loads=config.kv_transfer.load_failure_policy == "recompute",
                                   prompt_tokens_while_decoding=config.scheduler.prompt_tokens_while_decoding)
        self.sampler = Sampler(self.device, config.model.seed, self.tokenizer.eos_token_ids,
                               lambda text: self.tokenizer.encode(text, add_special_tokens=False))
        self.outputs = OutputProcessor(self.tokenizer.decode, self.tokenizer.eos_token_ids, self.max_model_len,
                                       grammar_backend(self.tokenizer, self.vocab_size))
        self._arrival = itertools.count()
        self._in_flight: InFlight | None = None  # the launched step whose sampled tokens the host has not read
        self.clock = step_clock(self.device)  # pdlaunch_engine_step_seconds, timed on the device
        self.async_scheduling = self._async_scheduling(config)
        # first tokens taken from a prefill's answer, out next step unless their request was aborted meanwhile
        self._admitted: list[tuple[Request, RequestOutput]] = []
        self._shut_down = False
        self._sleep = EngineSleep(self) if config.model.enable_sleep_mode else None
        metrics.KV_BLOCKS_TOTAL.set(self.block_manager.num_blocks)
        # /info and pdlaunch_model_dtypes_info: e.g. "fp8 block 128x128 (checkpoint)" and "float8_e4m3fn".
        self.weight_dtype = weight_dtype_name(self.checkpoint, self.dtype, self.device)
        self.kv_cache_dtype = str(self.runner.kv_dtype).removeprefix("torch.")
        metrics.MODEL_DTYPES.info({"weight_dtype": self.weight_dtype, "kv_cache_dtype": self.kv_cache_dtype})
        cache = instance_cache(config, instance)
        metrics.engine_info(self.max_model_len, {
            "block_size": self.block_size, "cache_dtype": cache.kv_cache_dtype,
            "enable_prefix_caching": cache.enable_prefix_caching,
            "gpu_memory_utilization": cache.gpu_memory_utilization, "num_gpu_blocks": self.block_manager.num_blocks,
            "num_gpu_blocks_override": cache.num_gpu_blocks, "kv_offload_gb": cache.kv_offload_gb})
        log.info("engine %s (%s) ready: %s on %s/%s, %d KV blocks of %d tokens, max_model_len %d",
                 self.engine_id, self.role, self.checkpoint.name, self.device, self.dtype,
                 self.block_manager.num_blocks, self.block_size, self.max_model_len)
        freeze_startup_heap()  # no collector walk over the startup heap while serving (memory/heap.py)

    # -- construction helpers --------------------------------------------------------------------
    def _bind_device(self, device: str) -> torch.device:
        if device == "cuda":
            if not torch.cuda.is_available():
                raise EngineError("CUDA was asked for but no CUDA device is visible", field="device",
                                  hint="use --device cpu or auto")
            index = self.instance.devices[0] if self.instance is not None and self.instance.devices else \
                current_device_index()
            set_device(index)
            return torch.device("cuda", index)
        if device != "cpu":
            raise EngineError(f"unknown device {device!r}", field="device", hint="use auto, cpu or cuda")
        return torch.device("cpu")

    def _async_scheduling(self, config: DeploymentConfig) -> bool:
        """scheduler.async_scheduling where it can run: one rank (the other ranks would need the device ids)
        and no KV offload (its copies are ordered against one step at a time). Unset: on with CUDA only. On CPU
        the host computes each step itself, so nothing overlaps, and reading the tokens a step later only holds
        each one back (demo model, colocated: TTFT 182 -> 127 ms without it; benchmarks/RESULTS.md)."""
        wanted = config.scheduler.async_scheduling
        if wanted is None:
            wanted = self.device.type == "cuda"
        if not wanted:
            return False
        if self.tp_size > 1 or self.offload is not None:
            log.info("async scheduling is off: it runs with TP 1 and without KV offload")
            return False
        return True

    def _max_model_len(self) -> int:
        limit = self.checkpoint.arch.max_position_embeddings
        wanted = self.config.model.max_model_len
        if wanted is None:
            return limit
        if wanted > limit:
            raise EngineError(f"max_model_len {wanted} exceeds the model's {limit} positions",
                              field="model.max_model_len", hint=f"use at most {limit}")
        return wanted

    @staticmethod
    def _create_connector(config: DeploymentConfig, instance: InstanceSpec) -> KVConnector | None:
        try:
            from pdlaunch.kv_transfer.factory import create_connector
        except ImportError as exc:
            log.warning("no KV connector available (%s): running %s without KV transfer", exc, instance.role)
            return None
        return create_connector(config, instance)

    def _create_offload(self, config: DeploymentConfig) -> OffloadManager | None:
        """The CPU tier for KV blocks evicted from the prefix cache (cache.kv_offload_gb > 0)."""
        if config.cache.kv_offload_gb <= 0:
            return None
        if not config.cache.enable_prefix_caching:
            raise EngineError("KV offload needs prefix caching (blocks are found again by prefix)",
                              field="cache.kv_offload_gb", hint="enable prefix caching or set --kv-offload-gb 0")
        if self.tp_size != 1:
            raise EngineError(f"KV offload runs with tensor-parallel size 1, got {self.tp_size}",
                              field="cache.kv_offload_gb", hint="set --kv-offload-gb 0 or --tp 1")
        return OffloadManager(self.block_manager, lambda: self.runner.kv_caches, config.cache.kv_offload_gb)

    def kv_cache_spec(self) -> KVCacheSpec:
        return kv_cache_spec(self.checkpoint, self.runner)  # rank 0's slice under TP

    # -- sleep mode ------------------------------------------------------------------------------
    def _sleep_mode(self) -> EngineSleep:
        if self._sleep is None:
            raise EngineError("sleep mode is not enabled", field="model.enable_sleep_mode",
                              hint="start the instance with --enable-sleep-mode")
        return self._sleep

    def sleep(self, level: int = 1) -> SleepResult:
        """Give the device memory back: level 1 keeps the weights in CPU memory, 2 discards them."""
        if not self.has_unfinished_requests():
            self._finish_in_flight()  # only finished requests' tokens: the device must be done with the KV
        if self.offload is not None:
            self.offload.wait_idle()  # no copy may touch the KV cache while it is released
        return self._sleep_mode().sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> WakeResult:
        """Take memory again for `tags` ("weights", "kv_cache"; None = both)."""
        return self._sleep_mode().wake_up(tags)

    def is_sleeping(self) -> bool:
        return self._sleep is not None and self._sleep.is_sleeping()

    # -- requests --------------------------------------------------------------------------------
    def check_kv_transfer_params(self, raw: object) -> KVTransferParams | None:
        """The engine's boundary for kv_transfer_params: `raw` (the request's JSON) parsed once into its
        model (typed, bounded, and signed by a prefill of this deployment when it asks for a remote
        prefill), or KVTransferError naming the field. Thread-safe: the HTTP side calls it before the
        request reaches the engine thread; everything below takes the model."""
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
            log.warning("kv_transfer_params %s; computing the prompt here (kv_transfer.load_failure_policy: "
                        "recompute)", exc.message)
            metrics.KV_LOAD_RECOMPUTES.inc()
            return None

    def _sign(self, answer: PrefillAnswer | None) -> JSONObject | None:
        """A prefill's answer leaves the engine as JSON, signed, valid for the KV lease (the blocks go after it)."""
        if answer is None:
            return None
        params = answer_json(answer)
        if self._params_key is None:
            return params
        return sign_kv_transfer_params(params, self._params_key, self.config.kv_transfer.kv_lease_seconds,
                                       time.time())

    def grammar_matcher(self, spec: StructuredOutput) -> LLMatcher:
        """A new matcher of a structured-output request's grammar; any thread may build it (the server builds it
        off the engine thread and hands it to add_request). EngineError naming the field when it cannot be."""
        return self.outputs.grammar_matcher(spec)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    kv_transfer_params: KVTransferParams | JSONObject | None = None,
                    matcher: LLMatcher | None = None) -> None:
        """Queue a request. `kv_transfer_params`: the model `check_kv_transfer_params` parsed (the server
        parses them before it queues the request), or the raw JSON object, parsed here. `matcher`: a new matcher
        of its structured output's grammar (grammar_matcher), else one is built here."""
        s = self.scheduler
        if request_id in self.outputs.tracked or request_id in s.held or request_id in s.draining:
            raise EngineError(f"request id {request_id!r} is already in use", field="request_id",
                              hint="use a unique id per request")
        if self.is_sleeping():
            raise InstanceAsleep("the instance is sleeping", field="sleep", hint="POST /wake_up first")
        prompt = list(prompt_token_ids)
        if not prompt:
            raise EngineError("the prompt is empty", field="prompt", hint="send at least one token")
        check_in_vocab(prompt, self.vocab_size, "prompt")
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:
            raise EngineError(
                too_long_message(len(prompt), params.max_tokens, self.max_model_len), field="prompt",
                hint="shorten the prompt or lower max_tokens")
        need = self._max_blocks_needed(total)
        if need > self.block_manager.num_blocks:
            raise EngineError(
                f"the request needs up to {need} KV blocks but the cache has {self.block_manager.num_blocks}",
                field="prompt", hint="shorten the request or give the KV cache more memory")
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
        kv = kv_transfer_params
        if isinstance(kv, dict):  # raw JSON (a direct engine user): parsed here, once
            kv = self.check_kv_transfer_params(kv)
        first = first_token_ids(kv)
        check_in_vocab(first, self.vocab_size, "kv_transfer_params.first_token_ids")
        request = Request(request_id, prompt, params, next(self._arrival), kv)
        if params.seed is not None:
            request.generator = self.sampler.new_request_generator(params.seed)
            skip_draws(request, params.seed_offset, self.vocab_size, self.device)
        self.outputs.add(request, matcher)
        self.scheduler.add_request(request)
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
    def longest_request(self) -> int:
        """The most tokens (prompt and output) one request may reach: max_model_len, or fewer when a
        full-attention group's KV cache holds fewer (a request that fills the context asks for no more)."""
        held = self.block_manager.num_blocks * self.block_size
        full = any(g.sliding_window is None for g in self.runner.groups)
        return min(self.max_model_len, held) if full else self.max_model_len

    def _max_blocks_needed(self, num_tokens: int) -> int:
        """Most blocks a request of `num_tokens` holds in one group at any step (a request that
        alone needs more than the cache has would preempt itself forever)."""
        bs = self.block_size
        whole = -(-num_tokens // bs)
        chunk = self.scheduler.max_num_batched_tokens
        return max(whole if g.sliding_window is None else min(whole, -(-(chunk + g.sliding_window) // bs) + 1)
                   for g in self.runner.groups)

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

    def release_held_kv_of_client(self, client_request_id: str) -> int:
        """release_held_kv for every held request whose engine id names the client's X-Request-Id
        ("{client id}-{8 hex}"); returns how many were released."""
        held = [rid for rid in self.scheduler.held if client_request_id_of(rid) == client_request_id]
        return sum(self.release_held_kv(rid) for rid in held)

    @property
    def rank_engine_ids(self) -> list[str]:
        """engine_id as each TP rank holds it, in rank order (all equal after the sync); /info shows it."""
        return self.executor.rank_engine_ids()

    @property
    def rank_nodes(self) -> list[str]:
        """The node address of each TP rank when the executor knows it (Ray, spanning groups); else []."""
        return self.executor.rank_nodes()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def is_quiescent(self) -> bool:
        """Nothing for a step to do until a new request comes: no request, no KV held for a decode or
        draining, no load or recompute, no sampled step in flight, no CPU-tier job. The engine loop then
        waits longer between idle steps (what such a step still polls can wait: a Forget notification is
        read before the next request is scheduled, a dead TP rank is found a fraction of a second later)."""
        s = self.scheduler
        return not (s.requests or s.held or s.draining or s.waiting_for_kv or s.recomputing
                    or self._admitted or self._in_flight is not None
                    or (self.offload is not None and not self.offload.idle))

    # -- the step --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self._admitted:  # first tokens out before this step's compute: the loop steps again at once
            admitted, self._admitted = self._admitted, []
            # an aborted request's output was its abort (its id may already name a new request)
            return [out for request, out in admitted if out.finished or not request.is_finished]
        outputs: list[RequestOutput] = []
        self.executor.check_health()  # a dead TP rank fails the instance even while it is idle
        if self.connector is not None:
            for request in self.scheduler.handle_connector_events(self.connector.get_finished()):
                outputs.append(self.outputs.output(request.request_id, [], ""))
        sched = self.scheduler.schedule()
        for request in self.scheduler.take_failed():  # the connector raised for it
            outputs.append(self.outputs.output(request.request_id, [], ""))
        if self.offload is not None:
            self.offload.before_compute()  # stores of evicted blocks, then loads, before compute
        logits = None
        if sched.scheduled:
            metrics.vllm(metrics.ITERATION_TOKENS).observe(sched.num_batched_tokens)
            mark = self.clock.begin(len(sched.scheduled), sched.num_batched_tokens)
            logits = self.executor.execute(build_step_inputs(sched.scheduled, self.block_manager, self._in_flight))
            argmax = self.executor.runner.argmax  # the greedy ids, when the step's graph computed them
            if self.executor.runner.prompt_logprobs is not None:
                distribute_prompt_logprobs([(s.request, s.start, s.end) for s in sched.scheduled],
                                           self.executor.runner.prompt_logprobs)
            self.scheduler.after_step(sched)
        outputs.extend(self._finish_in_flight())  # host work while the device computes this step
        if logits is not None:
            # a request that finished meanwhile (its last token was in flight) is not sampled again
            sampled_rows = [s.request for s in sched.scheduled if s.needs_sample]  # one logits row each
            rows = [i for i, r in enumerate(sampled_rows) if not r.is_finished]
            sampling = [sampled_rows[i] for i in rows]
            if sampling:
                if len(sampling) < len(sampled_rows):
                    keep = to_device_async(torch.tensor(rows), logits.device)
                    logits = logits.index_select(0, keep)
                    argmax = None if argmax is None else argmax.index_select(0, keep)
                sample_rows = self.outputs.sample_rows(sampling)
                if self.async_scheduling and deferrable(sample_rows):
                    self._in_flight = in_flight(sampling, self.sampler.sample_ids(logits, sample_rows, argmax))
                else:
                    sampled = self.sampler(logits, sample_rows, argmax)
                    outputs.extend(self._append_sampled(sampling, sampled.token_ids, sampled.logprobs,
                                                        sampled.failed))
            self.clock.end(mark)
        elif self.scheduler.waiting_for_kv and self._in_flight is None:
            time.sleep(0.001)  # only transfers are in flight: do not spin a core on polling
        self.clock.collect()
        update_metrics(self.scheduler, self.block_manager)
        return outputs

    def _finish_in_flight(self) -> list[RequestOutput]:
        """Read the launched step's sampled tokens and apply them (requests finished meanwhile drop theirs)."""
        if self._in_flight is None:
            return []
        step, self._in_flight = self._in_flight, None
        token_ids = step.read()
        for request in step.requests:
            request.num_pending -= 1
        live = [(r, t) for r, t in zip(step.requests, token_ids) if not r.is_finished]
        return self._append_sampled([r for r, _ in live], [t for _, t in live], [None] * len(live))

    def _append_sampled(self, requests: list[Request], token_ids: list[int], logprobs: list[TokenLogprob | None],
                        failed: dict[int, Exception] | None = None) -> list[RequestOutput]:
        """Each request's sampled token: detokenized, stop rules applied, finished requests ended. A request whose
        own sampling work raised (`failed`: row -> exception) or whose grammar, detokenizer or stop rules raise
        now ends with an error; the others go on."""
        outputs = []
        for i, (request, token_id, logprob) in enumerate(zip(requests, token_ids, logprobs)):
            if failed and i in failed:
                outputs.append(self._fail_request(request, "sampling its token", failed[i]))
                continue
            try:
                appended = self.outputs.append_token(request, token_id)
            except Exception as exc:  # noqa: BLE001 - this request's own code: it fails, the batch goes on
                outputs.append(self._fail_request(request, "taking its sampled token", exc))
                continue
            kv_params = None
            if appended.reason is not None:
                answer = self.scheduler.finish_request(request, appended.reason, appended.error, appended.error_status,
                                                       error_param=appended.error_param)
                kv_params = self._sign(with_first_token(answer, request, logprob))
            sampled = token_id != NO_TOKEN
            out = self.outputs.output(request.request_id, [token_id] if sampled else [], appended.text,
                                      [logprob] if logprob is not None and sampled else None, kv_params)
            if request.wants_prompt_logprobs:
                out.prompt_logprobs = take_prompt_logprobs(request)
            outputs.append(out)
        return outputs

    def _fail_request(self, request: Request, stage: str, exc: Exception) -> RequestOutput:
        """End a request whose own per-request work (grammar, logits processors, detokenizer, stop rules) raised:
        its client gets a 500 naming what failed, its blocks go back to the free list, and the rest of the batch
        and the instance go on (an exception out of step() would fail every request here)."""
        log.error("request %s failed while %s: %s", request.request_id, stage, exc, exc_info=exc)
        self.scheduler.finish_request(request, "error", f"the engine failed this request while {stage}: "
                                      f"{type(exc).__name__}: {exc}", 500)
        return self.outputs.output(request.request_id, [], "")

    # -- observability ---------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        return engine_stats(self.scheduler, self.block_manager, self.offload)

    def check_integrity(self) -> None:
        """Raise BlockIntegrityError unless the block manager is consistent and exactly the
        requests that should hold blocks (running, loaded or loading KV, held, draining) do."""
        self.block_manager.check_integrity()
        if self.offload is not None:
            self.offload.check_integrity()
        s = self.scheduler
        holders = {r.request_id for r in s.running} | set(s.waiting_for_kv) | set(s.held) | set(s.draining)
        holders |= set(s.recomputing)
        holders |= {r.request_id for r in s.waiting if self.block_manager.has_blocks(r.request_id)}
        if set(self.block_manager.tables) != holders:
            raise BlockIntegrityError(
                f"block tables of {sorted(self.block_manager.tables)} but holders {sorted(holders)}")
        for r in s.waiting:
            if r.status == RequestStatus.PREEMPTED and self.block_manager.has_blocks(r.request_id):
                raise BlockIntegrityError(f"preempted request {r.request_id} still holds blocks")
        if set(self.outputs.tracked) != set(s.requests):
            raise BlockIntegrityError(f"engine tracks {sorted(self.outputs.tracked)}, scheduler {sorted(s.requests)}")

    def shutdown(self) -> None:
        """Abort what is left, release the connector and the device memory. Idempotent."""
        if self._shut_down:
            return
        self._shut_down = True
        for request_id in list(self.outputs.tracked):
            self.abort_request(request_id)
        self._finish_in_flight()  # every request ended: nothing to emit, but the device must be done
        for kept in (self.scheduler.held, self.scheduler.draining):
            for request_id in list(kept):
                kept.pop(request_id)
                self.block_manager.free(request_id)
        if self.offload is not None:
            self.offload.shutdown()
        if self.connector is not None:
            self.connector.shutdown()
        self.executor.shutdown()
        thaw_heap()

