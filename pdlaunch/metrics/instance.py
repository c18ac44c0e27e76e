"""The instance's own series (`pdlaunch_*`) beside KV transfer and engine steps: its KV blocks and request
queues, the tokens it computed (prompts, again after a preemption), its latencies to the first token and
between streamed tokens, and what its weights and KV cache are computed in.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

from pdlaunch.metrics.buckets import FIRST_BYTE_BUCKETS

# pdlaunch_model_dtypes_info{weight_dtype="fp8 block 128x128 (checkpoint)",kv_cache_dtype="float8_e4m3fn"} 1
MODEL_DTYPES = Info("pdlaunch_model_dtypes", "What the weights are computed in and the KV cache element type")
PREEMPTED_TOKENS_RECOMPUTED = Counter(
    "pdlaunch_preempted_tokens_recomputed", "Tokens computed again after a preemption freed their KV: the prompt "
    "and output positions a preempted request had, less what the prefix cache (or CPU tier) gave back")
PROMPT_TOKENS_COMPUTED = Counter(
    "pdlaunch_prompt_tokens_computed", "Prompt tokens this instance computed: neither in its prefix cache (or CPU "
    "tier) nor loaded over a KV transfer, counted once computed (a request that failed or was aborted before counts "
    "none; a preemption's recompute is pdlaunch_preempted_tokens_recomputed) (bench serve --multi-turn reads it)")
KV_INTEGRITY_CHECKS = Counter(
    "pdlaunch_kv_integrity_checks", "KV block integrity checks run (once the engine has been idle a while: "
    "server/idle_check.py)")
KV_INTEGRITY_FAILURES = Counter(
    "pdlaunch_kv_integrity_failures", "KV block integrity checks that found the block bookkeeping inconsistent (a "
    "pdlaunch bug: the instance's log says what; please report it)")
KV_BLOCKS_USED = Gauge("pdlaunch_kv_blocks_used", "KV blocks in use")
KV_BLOCKS_TOTAL = Gauge("pdlaunch_kv_blocks_total", "KV blocks in the cache")
REQUESTS_RUNNING = Gauge("pdlaunch_requests_running", "Requests being computed")
REQUESTS_WAITING = Gauge("pdlaunch_requests_waiting", "Requests waiting for blocks or KV")
TIME_TO_FIRST_TOKEN = Histogram(
    "pdlaunch_time_to_first_token_seconds", "Time to first token",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
TIME_TO_FIRST_BYTE = Histogram(
    "pdlaunch_time_to_first_byte_seconds", "From a POST reaching the instance's HTTP side to the first byte of its "
    "2xx answer (a stream's first event): less pdlaunch_time_to_first_token_seconds, the instance's HTTP side "
    "(http/first_byte.py)", buckets=FIRST_BYTE_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "pdlaunch_inter_token_latency_seconds", "Time between streamed tokens",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
