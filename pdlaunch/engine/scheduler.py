"""Continuous batching: which requests compute how many tokens this step.

Each step gets at most `max_num_batched_tokens` tokens and `max_num_seqs` running requests.
Running requests go first (oldest first): a decode needs 1 token, an unfinished prompt the next
chunk that fits the token budget (chunked prefill). While any running request decodes, the step's
prompt tokens (every chunk of more than one token, or of a prompt) are capped at
`prompt_tokens_while_decoding` (0: no cap): a long prompt then stalls the decodes a chunk at a
time, not for its whole length; a step with no decode takes the whole budget. When blocks run out
the newest running request that still computes (not one whose last token is in flight: async scheduling) is
preempted (blocks freed, requeued at the front but behind requests holding KV that arrived, recomputed later:
its prefix cache usually makes that cheap, and what it does not give back counts in
pdlaunch_preempted_tokens_recomputed). Waiting
requests are admitted oldest first while budget, sequence slots and blocks last, and only in steps
that preempted nothing; one whose whole prompt's KV arrived through the connector computes only its last
prompt token, a decode's row, so the prompt cap does not hold it back, nor does it hold back a PD request's
consult of the connector (its load starts: nothing is computed until its KV arrives).

The waiting queue's admission is in engine/scheduler_admission.py; the queues themselves and the moves a KV
connector reports, in engine/scheduler_state.py.
"""

from __future__ import annotations

from pdlaunch.engine.request import Request, RequestStatus
from pdlaunch.engine.scheduler_admission import SchedulerAdmission
from pdlaunch.engine.scheduler_output import ScheduledRequest, SchedulerOutput
from pdlaunch.metrics.instance import PREEMPTED_TOKENS_RECOMPUTED, PROMPT_TOKENS_COMPUTED
from pdlaunch.metrics.vllm_series import NUM_PREEMPTIONS, vllm


class Scheduler(SchedulerAdmission):
    # -- scheduling ------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # The prompt tokens this step may still take (the cap holds only in a step that runs a decode).
        cap = self.prompt_tokens_while_decoding
        decoding = any(_decodes(r) and not r.last_token_pending for r in self.running)
        prompt_budget = cap if cap > 0 and decoding else budget
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if request.last_token_pending:  # async scheduling: its pending token is its last
                i += 1
                continue
            start = request.num_computed_tokens
            n = min(request.num_tokens - start, budget)
            prompt = not _decodes(request)
            if prompt:
                n = min(n, prompt_budget)
                if n == 0:  # this step's prompt tokens are spent (by a prompt ahead of it): the decodes after it run
                    i += 1
                    continue
            self.block_manager.release_out_of_window(request.request_id, start)
            while not self.block_manager.allocate(request.request_id, start + n, start):
                victim = self._newest_preemptible()
                self.running.remove(victim)
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                out.scheduled.append(ScheduledRequest(request, start, n))
                budget -= n
                if prompt:
                    prompt_budget -= n
                i += 1
                continue
            break
        if not out.preempted:
            self._admit_waiting(out, budget, min(budget, prompt_budget))
        for s in out.scheduled:
            self.prompt_tokens_computed += max(0, min(s.end, s.request.num_prompt_tokens) - s.start)
        return out

    def _newest_preemptible(self) -> Request:
        """The newest running request that still computes. One whose pending token is its last (async scheduling)
        needs no more blocks and that token ends it with its blocks: a PD prefill's hold for its decode (preempted, it
        held none and its decode's load failed) or a colocated request's cached prefix. The request being allocated
        for computes, so one is found; when every request after it is pending it preempts itself, and this step
        reads their tokens, which ends them and frees (or holds) their blocks: the next step admits it or it waits."""
        return next(r for r in reversed(self.running) if not r.last_token_pending)

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request.request_id)
        request.num_preempted_tokens = max(request.num_preempted_tokens, request.num_computed_tokens)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        self._requeue(request)
        self.num_preemptions += 1
        request.num_preemptions += 1
        vllm(NUM_PREEMPTIONS).inc()

    def after_step(self, out: SchedulerOutput) -> None:
        """The step's KV is written: advance progress and register newly full blocks."""
        for s in out.scheduled:
            request = s.request
            if s.start < request.num_preempted_tokens:  # what a preemption freed, computed again
                PREEMPTED_TOKENS_RECOMPUTED.inc(min(s.end, request.num_preempted_tokens) - s.start)
            # Prompt positions computed here for the first time, once they are: a request that ends before its
            # compute (its CPU-tier or KV load failed, aborted while its KV was on the way) computed none of them.
            first = min(s.end, request.num_prompt_tokens) - max(s.start, request.num_preempted_tokens)
            if first > 0:
                PROMPT_TOKENS_COMPUTED.inc(first)
            request.num_computed_tokens = s.end
            # only positions whose token the host knows (async scheduling: the sampled one may be pending)
            self.block_manager.cache_blocks(request.request_id, request.all_token_ids,
                                            min(s.end, len(request.all_token_ids)))


def _decodes(request: Request) -> bool:
    """True when the running request's next step computes one generated token (a decode), not prompt tokens
    (a chunk of its prompt, or of prompt and output recomputed after a preemption)."""
    return request.num_tokens - request.num_computed_tokens == 1 and \
        request.num_computed_tokens >= request.num_prompt_tokens
