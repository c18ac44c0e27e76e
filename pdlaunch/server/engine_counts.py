"""vLLM's counts of what the engine did, taken on the engine thread (engine_thread.py) as its outputs come, whether or
not a client reads them: each engine request's tokens (request_metrics.EngineTokens) and its end, once: stop / length,
an error (the engine ended that one request with finish_reason "error": its KV load failed under
kv_transfer.load_failure_policy fail, its constraints left no token, its own sampling work raised, ...; vLLM's
FinishReason.ERROR), or an abort (its client left, or the server stopped or the engine failed while it was open).

An abort is counted in /info's num_aborted_requests only, not in vllm:request_success: vLLM's frontend drops a
request its client aborted from its output processing before the engine's outputs are counted, so its
request_success{finished_reason="abort"} series exists but stays 0 (vLLM 0.11-0.13), and ours with it."""

from __future__ import annotations

from pdlaunch.engine.outputs import RequestOutput
from pdlaunch.metrics.vllm_series import ENDED_REASONS, GENERATION_TOKENS, REQUEST_SUCCESS, vllm
from pdlaunch.server.request_metrics import EngineTokens


class EngineCounts:
    """The engine thread's own: the engine requests not ended yet, and /info's num_aborted_requests."""

    def __init__(self) -> None:
        self.running: dict[str, EngineTokens] = {}  # in the engine, not ended
        self.num_aborted = 0  # requests stopped before they finished (client gone, shutdown, failure): count_abort

    def started(self, request_id: str) -> None:
        """The engine took the request: its outputs and its end are counted from now on."""
        self.running[request_id] = EngineTokens()

    def count_abort(self) -> None:
        """A request stopped before it finished (its client left, another choice of its HTTP request failed, the
        server stopped or the engine failed): /info's num_aborted_requests, once per engine request (a choice of
        n > 1 too). Not vllm:request_success (module docstring)."""
        self.num_aborted += 1

    def abort_running(self) -> None:
        """Every request the engine took and has not ended ends as an abort, counted once (the server stopped or the
        engine failed: no output of theirs will come)."""
        running, self.running = self.running, {}
        for _ in running:
            self.count_abort()

    def counted(self, out: RequestOutput) -> int:
        """vLLM's counts of an output the engine produced, read by a client or not: its prompt (once, with its first
        output after admission, a token or the error that ended it, as vLLM adds it; not with an abort), and the end
        of its request once (stop, length and error: request_success by finished_reason, as vLLM's FinishReason names
        them; abort: count_abort, not in request_success). The request stops being running here at its end: an
        abort or a stop after it (its client left, the server stopped) counts nothing more. Returns its generated
        tokens, which the caller adds to vllm:generation_tokens (add_generated)."""
        tokens = self.running.get(out.request_id)
        if tokens is None:
            return 0
        generated = tokens.output(out)
        if not out.finished:
            return generated
        del self.running[out.request_id]
        if out.finish_reason == "abort":
            self.count_abort()
        elif out.finish_reason in ENDED_REASONS:
            vllm(REQUEST_SUCCESS, finished_reason=out.finish_reason).inc()
        return generated


def add_generated(count: int) -> None:
    if count:
        vllm(GENERATION_TOKENS).inc(count)
