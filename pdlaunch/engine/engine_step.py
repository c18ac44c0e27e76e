"""One step of the engine: poll the KV connector, schedule, run the model, sample, and turn the sampled tokens
into outputs (detokenized, stop rules applied, a prefill's answer signed). With async scheduling
(engine/async_step.py) a step launches its forward before it reads the previous step's sampled tokens.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from pdlaunch.engine.arrival_window import ArrivalWindow
from pdlaunch.engine.async_step import InFlight, deferrable, in_flight
from pdlaunch.engine.first_token import with_first_token
from pdlaunch.engine.outputs import RequestOutput, TokenLogprob
from pdlaunch.engine.prompt_logprobs import distribute as distribute_prompt_logprobs
from pdlaunch.engine.prompt_logprobs import take as take_prompt_logprobs
from pdlaunch.engine.request import Request
from pdlaunch.engine.sampler import NO_TOKEN
from pdlaunch.engine.stats import update_metrics
from pdlaunch.engine.step_builder import build_step_inputs
from pdlaunch.kv_transfer.params import JSONObject, PrefillAnswer, answer_json, sign_kv_transfer_params
from pdlaunch.memory.platform import to_device_async
from pdlaunch.metrics.vllm_series import ITERATION_TOKENS, vllm

if TYPE_CHECKING:
    from pdlaunch.config.deployment_config import DeploymentConfig
    from pdlaunch.distributed.executor import UniprocExecutor
    from pdlaunch.distributed.ray_executor import RayTPExecutor
    from pdlaunch.distributed.tp_executor import TPExecutor
    from pdlaunch.engine.allocator_watch import AllocatorWatch
    from pdlaunch.engine.output_processor import OutputProcessor
    from pdlaunch.engine.sampler import Sampler
    from pdlaunch.engine.scheduler import Scheduler
    from pdlaunch.engine.step_clock import StepClock
    from pdlaunch.kv_transfer.base import KVConnector
    from pdlaunch.kvcache.block_manager import BlockManager
    from pdlaunch.offload.manager import OffloadManager

log = logging.getLogger("pdlaunch.engine.llm_engine")  # the engine's one logger name, across its files


class EngineStep:
    # The engine's parts these methods read; LLMEngine.__init__ builds them.
    config: DeploymentConfig
    _params_key: bytes | None
    executor: UniprocExecutor | TPExecutor | RayTPExecutor
    block_manager: BlockManager
    connector: KVConnector | None
    offload: OffloadManager | None
    scheduler: Scheduler
    sampler: Sampler
    outputs: OutputProcessor
    clock: StepClock
    allocator: AllocatorWatch | None
    async_scheduling: bool
    _in_flight: InFlight | None
    _window: ArrivalWindow
    _admitted: list[tuple[Request, RequestOutput]]
    _blocked = False  # the last step could run nothing until KV blocks are freed (is_blocked)

    def step(self) -> list[RequestOutput]:
        if self._admitted:  # first tokens out before this step's compute: the loop steps again at once
            self._blocked = False
            return self.take_admitted()
        outputs: list[RequestOutput] = []
        started = self._window.stepping()
        self.executor.check_health()  # a dead TP rank fails the instance even while it is idle
        if self.connector is not None:
            for request in self.scheduler.handle_connector_events(self.connector.get_finished()):
                outputs.append(self.outputs.output(request.request_id, [], ""))
        sched = self.scheduler.schedule()
        for request in self.scheduler.take_failed():  # the connector raised for it
            outputs.append(self.outputs.output(request.request_id, [], ""))
        if self.offload is not None:
            self.offload.before_compute()  # stores of evicted blocks, then loads, before compute
            for request in self.scheduler.fail_cpu_loads(sched, self.offload.take_failed_loads()):
                outputs.append(self.outputs.output(request.request_id, [], ""))
        logits = None
        if sched.scheduled:
            vllm(ITERATION_TOKENS).observe(sched.num_batched_tokens)
            mark = self.clock.begin(len(sched.scheduled), sched.num_batched_tokens)
            logits = self.executor.execute(build_step_inputs(sched.scheduled, self.block_manager, self._in_flight))
            self._window.launched(started, self._in_flight.done() if self._in_flight is not None else None)
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
        if self.allocator is not None:
            self.allocator.poll()
        update_metrics(self.scheduler, self.block_manager)
        s = self.scheduler
        # Requests wait, yet nothing ran, changed or is in flight: the connector's events were applied before
        # schedule(), so the next step finds the same until something frees blocks.
        self._blocked = bool(s.waiting) and not (sched.scheduled or sched.preempted or outputs or s.running
                                                 or s.waiting_for_kv or self._in_flight is not None)
        return outputs

    def is_blocked(self) -> bool:
        """True when the last step could run nothing and only something from outside the engine changes that:
        requests wait for KV blocks while none runs or is in flight, and the blocks they need are held for decode legs
        (until the decode's read_done/release, a release_held_kv or the lease's end), drain or wait for a failed
        load's transfer, or are in a CPU-tier job. A step at once would find the same: the engine loop waits for a
        command up to its blocked_wait_s instead (server/engine_thread.py). Never while a KV load is waited for
        (waiting_for_kv): step() paces those polls itself, at the latency a load's end is found with."""
        return self._blocked

    def arrival_window_s(self) -> float:
        """Seconds the engine loop may wait for new requests before the next `step` without the device running
        out of work: with a step in flight on a GPU, what is left of its ArrivalWindow (arrival_window.py); else 0."""
        if self._in_flight is None or self._in_flight.ready is None:
            return 0.0
        return self._window.seconds(self.clock.decode_step_s)

    def take_admitted(self) -> list[RequestOutput]:
        """The outputs of the PD decodes admitted since the last step with their prefill's first token(s) (add_request),
        without any compute: step() hands them out first; a server that stops takes them, so that a request its first
        token ended is answered and counted as it ended (stop or length) rather than aborted."""
        admitted, self._admitted = self._admitted, []
        # an aborted request's output was its abort (its id may already name a new request)
        return [out for request, out in admitted if out.finished or not request.is_finished]

    def _finish_in_flight(self) -> list[RequestOutput]:
        """Read the launched step's sampled tokens and apply them (requests finished meanwhile drop theirs)."""
        if self._in_flight is None:
            return []
        step, self._in_flight = self._in_flight, None
        token_ids = step.read()
        self._window.read()  # the device has started the step launched after it
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

    def _sign(self, answer: PrefillAnswer | None) -> JSONObject | None:
        """A prefill's answer leaves the engine as JSON, signed, valid for the KV lease (the blocks go after it)."""
        if answer is None:
            return None
        params = answer_json(answer)
        if self._params_key is None:
            return params
        return sign_kv_transfer_params(params, self._params_key, self.config.kv_transfer.kv_lease_seconds,
                                       time.time())
