"""The `proxy` section: the PD router's address, routing policy, timeouts, workers and per-request
disaggregation."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

from pdlaunch.config.addresses import Host
from pdlaunch.config.proxy_workers import MAX_WORKERS
from pdlaunch.config.strict_model import MAX_ITL_MS, MAX_SECONDS, MAX_TOKENS, StrictModel


def _workers(value: object) -> object:
    """`auto` or a whole number of workers; a flag's text "4" reads as 4."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_WORKERS):
        return value
    raise ValueError(f"must be auto or a whole number from 1 to {MAX_WORKERS}, got {value!r}")


ProxyWorkers = Annotated[int | Literal["auto"], BeforeValidator(_workers)]


class ProxyConfig(StrictModel):
    host: Host = Field("127.0.0.1", description="Proxy bind address.")
    port: int = Field(8000, description="Proxy port (the one clients use).")
    routing_policy: Literal["round_robin", "least_loaded", "prefix"] = Field(
        "round_robin", description="Instance choice: round_robin, least_loaded, or prefix (the instance caching the "
        "longest prefix of the prompt, weighed against the prompt tokens queued there; from the instances' KV cache "
        "events).")
    request_timeout_seconds: float = Field(300.0, gt=0, le=MAX_SECONDS, description="Whole-request timeout at the "
                                           "proxy (at most a week).")
    restart: bool = Field(True, description="Restart the proxy if it dies (same port).")
    workers: ProxyWorkers = Field(
        "auto", description="Proxy processes sharing the port: auto (the default: one per 8 CPUs the proxy may use "
        "where it runs, affinity and cgroup CPU limit counted, 1 to 4) or 1 to 64. One worker adds latency to every "
        "request long before it fills a core (new requests wait behind each decode step's burst of stream events; "
        "README \"Proxy workers\"). Each is a whole proxy; their load counts are shared (least_loaded, the prefix "
        "policy's queue weights and disaggregate_max_queue_tokens count every worker's requests); /metrics sums "
        "their counters. A worker that dies restarts the whole proxy.")
    health_timeout_seconds: float = Field(
        2.0, gt=0, le=60, description="An instance whose /health does not answer within this is marked stalled "
        "and gets no new requests until it answers again (probed every second; the launcher uses it too).")
    prefill_timeout_seconds: float | None = Field(
        None, gt=0, le=MAX_SECONDS, description="Deadline of the prefill leg: past it the leg is abandoned and retried "
        "once on another prefill, else computed by the decode (kv_transfer.load_failure_policy: recompute) or "
        "failed with a 504 (at most a week); a prefill that is gone (refused or dropped the connection, stopping) "
        "is left the same way. Unset: derived from the prompt's length and the measured prefill speed (README).")
    disaggregate_min_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS, description=f"A prompt of fewer tokens (counted by the proxy with the model's "
        f"tokenizer; at most {MAX_TOKENS}) runs on a decode instance alone: no prefill leg, no KV transfer. Unset: "
        "every request is PD.")
    disaggregate_max_queue_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS, description=f"While every ready prefill instance has this many (at most "
        f"{MAX_TOKENS}) prompt tokens queued (legs sent, "
        "not answered), a prompt that would go PD runs on its decode alone, up to this many such tokens in flight "
        "per decode (with disaggregate_max_itl_ms, the prompt's own tokens included): a burst of long prompts "
        "waits no longer than this much prefill work. Needs disaggregate_min_tokens. Unset: PD prompts always "
        "queue for a prefill.")
    disaggregate_max_itl_ms: float | None = Field(
        None, gt=0, le=MAX_ITL_MS, description="A prompt that would run on its decode alone (shorter than "
        "disaggregate_min_tokens, or spilled) goes PD instead while that decode's streams wait this many ms or more "
        "per token (the mean over its last second, from its /health): prompt work there would push them past the "
        "TPOT target. Set it a little under that target (at most 60000). Needs disaggregate_min_tokens. Unset: no "
        "such check.")
    migration_limit: int = Field(
        3, ge=0, le=100, description="A request whose decode dies or stalls (health_timeout_seconds) mid-request "
        "goes on on another decode from its prompt + the tokens already sent, at most this many times per request "
        "(then an error event with code migration_limit). 0: off (a stream whose decode dies ends with an error "
        "event; one whose decode stalls waits for it, at most request_timeout_seconds).")
