"""vLLM's per-request series of an instance (metrics/vllm_series.py): what the engine computed, counted where the engine
produces its outputs (EngineTokens, on the engine thread), and what the client saw (RequestMetrics, as the HTTP
handler reads those outputs).

EngineTokens: vllm:prompt_tokens and vllm:generation_tokens, exact whether or not a client reads the outputs (one
that left, a request aborted mid-stream): every token the engine generated here, as vLLM's engine counts them in
its output processing. vllm:prompt_tokens means what it means in vLLM: a prompt's whole length, its cached tokens
included, added once, with the request's first output after the scheduler admitted it (to run, or to wait for its
KV), whether that output carries a token or is the error that ended it: vLLM's IterationStats adds prompt_len with
a request's first output while it is prefilling, with or without a token (a KV load that failed, say). A request
aborted before that output adds nothing (vLLM drops a request its client aborted before any output of it is
processed); a PD decode's first token, which its prefill sampled before the scheduler admitted the decode, does not
count, its next output (the KV loaded, or the load's error) does. Once per sample with n > 1 / best_of, as vLLM
counts it (each sample is one of its requests), so dashboards built on vLLM's series read the same;
usage.prompt_tokens counts the prompt once, as vLLM's does. With it, vllm:prompt_tokens_by_source splits that prompt
by where its KV came from (local_compute, local_cache_hit: this instance's prefix cache or CPU tier,
external_kv_transfer: a connector's load, a PD decode's from its prefill), as the request's admission found it, and
vllm:prompt_tokens_cached counts the latter two. Each engine request's end is counted on the engine
thread too, once (engine_counts.EngineCounts.counted: request_success by finished_reason, stop, length or error;
an abort only in /info's num_aborted_requests, through EngineCounts.count_abort, as vLLM never counts one there).

RequestMetrics: times run from when the instance received the request: time to first token, inter-token latency,
end-to-end latency, decode time (first to last token), its mean time per output token
(vllm:request_time_per_output_token_seconds: decode time over the tokens after the first, 0 with fewer than two, as
vLLM's); prefill time (first admission to first token) and inference time (first admission to last token) from when
the scheduler first admitted it; the request's max_tokens, its prompt and generated token counts, and the prompt tokens
whose KV the engine computed (vllm:request_prefill_kv_computed_tokens: the prompt less its tokens found in the prefix
cache or loaded over a KV transfer when the scheduler admitted it to run, as vLLM's: a PD decode that loaded its
prompt's KV computed none of it, or its last token alone when its prefill's first token did not come with it), and the
times the scheduler preempted it (vllm:request_num_preemptions). The
histograms of a request's end (e2e, prompt and generation tokens,
prefill KV computed tokens, max_tokens, preemptions, inference, decode, time per output token) are recorded
once for every request the engine ended, stop, length or error alike, as vLLM records them for every request its
engine finishes, errors included; not for an abort (its client left, the server stopped, the engine failed): vLLM
records none for a request its frontend aborted either. A phase a request never reached (no token: no decode time)
is not recorded.

SampleGroup: the samples of one prompt (n > 1, best_of), each an engine request, as vLLM's parent request and its
children: vllm:request_params_n (the request's n) and vllm:request_max_num_generation_tokens (the most tokens one of
them generated) are observed once per group, when the last of them ended, none if one was aborted (vLLM records
them when its parent's last child finishes; an aborted child never does). A plain request is a group of one.
"""

from __future__ import annotations

import logging
import os
import time

from pdlaunch.engine.outputs import RequestOutput
from pdlaunch.metrics.vllm_series import (
    E2E_REQUEST_LATENCY,
    ENDED_REASONS,
    INTER_TOKEN_LATENCY_VLLM,
    PROMPT_TOKENS,
    REQUEST_DECODE_TIME,
    REQUEST_INFERENCE_TIME,
    REQUEST_NUM_PREEMPTIONS,
    REQUEST_PARAMS_N,
    REQUEST_PREFILL_TIME,
    REQUEST_TIME_PER_OUTPUT_TOKEN,
    TIME_TO_FIRST_TOKEN_VLLM,
    count_prompt_sources,
    token_histograms,
    vllm,
)

log = logging.getLogger("pdlaunch.server.requests")
if os.environ.get("PDLAUNCH_LOG_LEVEL", "").lower() == "debug":  # as the proxy's --log-level default
    log.setLevel(logging.DEBUG)


class EngineTokens:
    """One engine request's vllm:prompt_tokens and vllm:generation_tokens, counted from each output the engine
    produces for it (on the engine thread)."""

    def __init__(self) -> None:
        self._prompt_pending = True  # its prompt goes into vllm:prompt_tokens once (output)

    def output(self, out: RequestOutput) -> int:
        """Counts its prompt once, with its first output after admission that is not its abort; returns its
        generated tokens, for the caller to add to vllm:generation_tokens (once per step for all requests: a labelled
        increment costs ~4 us)."""
        count = len(out.new_token_ids)
        if self._prompt_pending and out.scheduled_at is not None and out.finish_reason != "abort":
            # vLLM adds a prompt with its request's first output, a token or not (an error ending it): an abort is
            # its client's (or the server's), whose request vLLM drops before any output of it counts
            self._prompt_pending = False
            vllm(PROMPT_TOKENS).inc(out.num_prompt_tokens)
            count_prompt_sources(out.num_prompt_tokens, out.num_cached_tokens, out.num_external_tokens)
        return count


class SampleGroup:
    """The `size` samples of one prompt of a request whose n is `n`: its parent request's series, once."""

    def __init__(self, n: int = 1, size: int = 1) -> None:
        self.n = n
        self._open = size  # samples not ended yet
        self._max_generated = 0

    def ended(self, num_generated: int) -> None:
        """One sample ended by the engine (stop, length or error) after generating `num_generated` tokens."""
        self._max_generated = max(self._max_generated, num_generated)
        self._open -= 1
        if self._open:
            return
        vllm(REQUEST_PARAMS_N).observe(self.n)
        tokens = token_histograms()
        if tokens is not None:
            vllm(tokens.max_num_generation).observe(self._max_generated)


class RequestMetrics:
    """One engine request's series; `arrival` is time.monotonic() when the instance received it, `group` the samples
    of its prompt (a group of its own by default)."""

    def __init__(self, request_id: str, endpoint: str, arrival: float, group: SampleGroup | None = None,
                 max_tokens: int | None = None) -> None:
        self.request_id, self.endpoint, self.arrival = request_id, endpoint, arrival
        self.group = group if group is not None else SampleGroup()
        self.max_tokens = max_tokens  # the request's parameter (vllm:request_params_max_tokens)
        self._scheduled: float | None = None  # first admission by the scheduler
        self._first_token: float | None = None
        self._last_token: float | None = None
        self._num_prompt = 0
        self._num_kv_reused = 0  # prompt tokens the engine did not compute: prefix cache hits and KV loaded
        self._num_generated = 0
        self._num_preemptions = 0
        self._ended = False

    def accepted(self, num_prompt_tokens: int) -> None:
        self._num_prompt = num_prompt_tokens

    def output(self, out: RequestOutput) -> None:
        now, count = time.monotonic(), len(out.new_token_ids)
        if self._scheduled is None and out.scheduled_at is not None:
            self._scheduled = out.scheduled_at
        self._num_kv_reused = out.num_cached_tokens + out.num_external_tokens  # its last admission's
        self._num_preemptions = out.num_preemptions
        if count:
            if self._last_token is None:
                self._first_token = now
                vllm(TIME_TO_FIRST_TOKEN_VLLM).observe(now - self.arrival)
                if self._scheduled is not None:  # PREFILL phase: first admission to first token
                    vllm(REQUEST_PREFILL_TIME).observe(max(0.0, now - self._scheduled))
            else:
                for _ in range(count):
                    vllm(INTER_TOKEN_LATENCY_VLLM).observe((now - self._last_token) / count)
            self._last_token = now
            self._num_generated += count
        if out.finished and not self._ended:
            self._ended = True
            self._finished(out.finish_reason or "", now)

    def _finished(self, reason: str, now: float) -> None:
        # One line per request at DEBUG (the proxy logs the same X-Request-Id with the instances it used).
        log.debug("request %s %s: %s, %d prompt + %d generated tokens, %.3fs", self.request_id, self.endpoint,
                  reason, self._num_prompt, self._num_generated, now - self.arrival)
        if reason not in ENDED_REASONS:  # vLLM records these for every request its engine finished, errors
            return  # included; a frontend abort, never
        vllm(E2E_REQUEST_LATENCY).observe(now - self.arrival)
        self.group.ended(self._num_generated)
        tokens = token_histograms()
        if tokens is not None:  # made with the engine (vllm_series.engine_info)
            vllm(tokens.prompt).observe(self._num_prompt)  # as vLLM: per finished request
            vllm(tokens.generation).observe(self._num_generated)
            vllm(tokens.prefill_kv_computed).observe(max(0, self._num_prompt - self._num_kv_reused))
            if self.max_tokens is not None:
                vllm(tokens.params_max_tokens).observe(self.max_tokens)
        vllm(REQUEST_NUM_PREEMPTIONS).observe(self._num_preemptions)
        last = self._last_token  # an error's output may carry none: the phases end at the last token, as vLLM's
        if self._scheduled is not None and last is not None:  # RUNNING phase: first admission to the last token
            vllm(REQUEST_INFERENCE_TIME).observe(max(0.0, last - self._scheduled))
        per_token = 0.0  # vLLM's for a request with fewer than two tokens (none after the first)
        if self._first_token is not None and last is not None:
            vllm(REQUEST_DECODE_TIME).observe(last - self._first_token)
            if self._num_generated > 1:
                per_token = (last - self._first_token) / (self._num_generated - 1)
        vllm(REQUEST_TIME_PER_OUTPUT_TOKEN).observe(per_token)
