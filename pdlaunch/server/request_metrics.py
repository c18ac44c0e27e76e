"""vLLM's per-request series, recorded as an instance answers one request (pdlaunch/metrics.py).

Times run from when the instance received the request: time to first token, inter-token latency,
end-to-end latency; counts are exact: every prompt token of an accepted request, every generated
token, one success per request that finished (stop / length) under its finished_reason.
"""

from __future__ import annotations

import time

from pdlaunch import metrics
from pdlaunch.engine.outputs import RequestOutput


class RequestMetrics:
    def __init__(self) -> None:
        self.arrival = time.monotonic()
        self._last_token: float | None = None
        self._num_generated = 0
        self._ended = False

    def accepted(self, num_prompt_tokens: int) -> None:
        metrics.vllm(metrics.PROMPT_TOKENS).inc(num_prompt_tokens)
        metrics.vllm(metrics.REQUEST_PROMPT_TOKENS).observe(num_prompt_tokens)

    def output(self, out: RequestOutput) -> None:
        now, count = time.monotonic(), len(out.new_token_ids)
        if count:
            if self._last_token is None:
                metrics.vllm(metrics.TIME_TO_FIRST_TOKEN_VLLM).observe(now - self.arrival)
            else:
                for _ in range(count):
                    metrics.vllm(metrics.INTER_TOKEN_LATENCY_VLLM).observe((now - self._last_token) / count)
            self._last_token = now
            self._num_generated += count
            metrics.vllm(metrics.GENERATION_TOKENS).inc(count)
        if out.finished and not self._ended and out.finish_reason in ("stop", "length"):
            self._ended = True
            metrics.vllm(metrics.REQUEST_SUCCESS, finished_reason=out.finish_reason).inc()
            metrics.vllm(metrics.E2E_REQUEST_LATENCY).observe(now - self.arrival)
            metrics.vllm(metrics.REQUEST_GENERATION_TOKENS).observe(self._num_generated)
