"""vLLM's series of an instance (`vllm:*`), under vLLM's names, types and labels (`model_name`, `engine`), so
vLLM's Grafana dashboards work unchanged. Label them through `vllm(metric)`, which applies this instance's model
name (`set_model_name`, called once when the instance starts). The token-count histograms and
vllm:cache_config_info are made by the process's first engine (`engine_info`): their buckets run up to its
max_model_len.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

# Names, types and labels as vLLM's V1 engine exports them.
LABELS = ["model_name", "engine"]
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0)
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
# vLLM's inter-token-latency buckets, which its per-request mean time per output token shares
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
# vLLM's NixlConnector's (0.13)
_XFER_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0)
_XFER_BYTES_BUCKETS = tuple(float(2**k) for k in range(11, 34, 2))  # 2 KiB .. 8 GiB

NUM_REQUESTS_RUNNING = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.", LABELS)
NUM_REQUESTS_WAITING = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed "
                             "(for blocks or for their KV from a prefill instance).", LABELS)
KV_CACHE_USAGE = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", LABELS)
NUM_PREEMPTIONS = Counter("vllm:num_preemptions", "Cumulative number of preemptions from the engine.", LABELS)
PROMPT_TOKENS = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", LABELS)
GENERATION_TOKENS = Counter("vllm:generation_tokens", "Number of generation tokens processed.", LABELS)
# With vllm:prompt_tokens, once per request (count_prompt_sources): its prompt by where each position's KV came from,
# computed here, this instance's prefix cache (or CPU tier), or a connector's load (a PD decode's, from its prefill);
# the three add up to vllm:prompt_tokens. _cached: the latter two.
PROMPT_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
PROMPT_TOKENS_BY_SOURCE = Counter("vllm:prompt_tokens_by_source", "Number of prompt tokens by source.",
                                  LABELS + ["source"])
PROMPT_TOKENS_CACHED = Counter("vllm:prompt_tokens_cached", "Number of cached prompt tokens (local + external).",
                               LABELS)
# vLLM's, with them: 1 for a prompt whose tokens but the last were all cached or loaded (the last is computed anyway: a
# forward pass needs one). No preemption's recompute, as vLLM's: pdlaunch_preempted_tokens_recomputed counts those.
PROMPT_TOKENS_RECOMPUTED = Counter("vllm:prompt_tokens_recomputed", "Number of cached tokens recomputed for forward "
                                   "pass.", LABELS)
REQUEST_SUCCESS = Counter("vllm:request_success", "Count of successfully processed requests.",
                          LABELS + ["finished_reason"])
# its finished_reason of a request the engine ended, as vLLM's FinishReason names them (a request that failed on its
# own is "error"). The fourth, "abort", exists at 0 and stays there, as vLLM's: its frontend drops a request its client
# aborted before the engine's outputs are counted (server/engine_counts.py)
ENDED_REASONS = ("stop", "length", "error")
PREFIX_CACHE_QUERIES = Counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of "
                               "queried tokens.", LABELS)
PREFIX_CACHE_HITS = Counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                            LABELS)
# Once per request whose KV connector was asked (engines with one: PD roles), when it was asked: its prompt tokens, and
# those the connector had (loaded from a prefill)
EXTERNAL_PREFIX_CACHE_QUERIES = Counter("vllm:external_prefix_cache_queries", "External prefix cache queries from KV "
                                        "connector cross-instance cache sharing, in terms of number of queried "
                                        "tokens.", LABELS)
EXTERNAL_PREFIX_CACHE_HITS = Counter("vllm:external_prefix_cache_hits", "External prefix cache hits from KV connector "
                                     "cross-instance cache sharing, in terms of number of cached tokens.", LABELS)
SLEEP_STATES = ("awake", "weights_offloaded", "discard_all")  # set_sleep_state
ENGINE_SLEEP_STATE = Gauge("vllm:engine_sleep_state", "Engine sleep state; awake = 0 means engine is sleeping; awake "
                           "= 1 means engine is awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 "
                           "means sleep level 2.", LABELS + ["sleep_state"])
TIME_TO_FIRST_TOKEN_VLLM = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in "
                                     "seconds.", LABELS, buckets=_TTFT_BUCKETS)
INTER_TOKEN_LATENCY_VLLM = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in "
                                     "seconds.", LABELS, buckets=_ITL_BUCKETS)
E2E_REQUEST_LATENCY = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in "
                                "seconds.", LABELS, buckets=_REQUEST_BUCKETS)
# A finished request's mean time per output token (its first token excluded; 0 with fewer than two), as vLLM computes
# it. Not vllm:time_per_output_token_seconds: that was vLLM's old name of inter_token_latency_seconds, deprecated in
# 0.11, hidden from 0.12 (shown only on request) and no longer made by 0.33, so not exported here.
REQUEST_TIME_PER_OUTPUT_TOKEN = Histogram("vllm:request_time_per_output_token_seconds", "Histogram of "
                                          "time_per_output_token_seconds per request.", LABELS, buckets=_ITL_BUCKETS)
REQUEST_DECODE_TIME = Histogram("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for "
                                "request.", LABELS, buckets=_REQUEST_BUCKETS)
ITERATION_TOKENS = Histogram("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.", LABELS,
                             buckets=(1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384))
REQUEST_QUEUE_TIME = Histogram("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase "
                               "for request.", LABELS, buckets=_REQUEST_BUCKETS)
REQUEST_PREFILL_TIME = Histogram("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase "
                                 "for request.", LABELS, buckets=_REQUEST_BUCKETS)
REQUEST_INFERENCE_TIME = Histogram("vllm:request_inference_time_seconds", "Histogram of time spent in RUNNING "
                                   "phase for request.", LABELS, buckets=_REQUEST_BUCKETS)
# A request the engine ended (stop, length, error): the times the scheduler preempted it (vLLM 0.30's buckets)
REQUEST_NUM_PREEMPTIONS = Histogram("vllm:request_num_preemptions", "Histogram of the number of preemptions of a "
                                    "finished request.", LABELS, buckets=(1, 2, 3, 4, 5, 10, 20))
# once per parent request: a prompt's samples, when the last of them ended (request_metrics.SampleGroup), as vLLM's
REQUEST_PARAMS_N = Histogram("vllm:request_params_n", "Histogram of the n request parameter.", LABELS,
                             buckets=(1, 2, 5, 10, 20))
NIXL_XFER_TIME = Histogram("vllm:nixl_xfer_time_seconds", "Histogram of transfer duration for NIXL KV Cache "
                           "transfers.", LABELS, buckets=_XFER_SECONDS_BUCKETS)
NIXL_BYTES_TRANSFERRED = Histogram("vllm:nixl_bytes_transferred", "Histogram of bytes transferred per NIXL KV "
                                   "Cache transfers.", LABELS, buckets=_XFER_BYTES_BUCKETS)
NIXL_NUM_FAILED_TRANSFERS = Counter("vllm:nixl_num_failed_transfers", "Number of failed NIXL KV Cache "
                                    "transfers.", LABELS)

_model_name = ""
M = TypeVar("M", bound=MetricWrapperBase)


def set_model_name(name: str) -> None:
    """The `model_name` label of every vllm:* series of this process (its served model name)."""
    global _model_name
    _model_name = name
    for metric in (NUM_REQUESTS_RUNNING, NUM_REQUESTS_WAITING, KV_CACHE_USAGE, NUM_PREEMPTIONS, PROMPT_TOKENS,
                   GENERATION_TOKENS, PREFIX_CACHE_QUERIES, PREFIX_CACHE_HITS, TIME_TO_FIRST_TOKEN_VLLM,
                   EXTERNAL_PREFIX_CACHE_QUERIES, EXTERNAL_PREFIX_CACHE_HITS,
                   INTER_TOKEN_LATENCY_VLLM, E2E_REQUEST_LATENCY, REQUEST_QUEUE_TIME, REQUEST_TIME_PER_OUTPUT_TOKEN,
                   REQUEST_DECODE_TIME, ITERATION_TOKENS, NIXL_XFER_TIME, NIXL_BYTES_TRANSFERRED,
                   NIXL_NUM_FAILED_TRANSFERS, REQUEST_PREFILL_TIME, REQUEST_INFERENCE_TIME, REQUEST_PARAMS_N,
                   PROMPT_TOKENS_CACHED, PROMPT_TOKENS_RECOMPUTED, REQUEST_NUM_PREEMPTIONS,
                   *(_token_histograms.all() if _token_histograms is not None else ())):
        vllm(metric)  # every series exists (at 0) from the start, as a dashboard expects
    for reason in (*ENDED_REASONS, "abort"):
        vllm(REQUEST_SUCCESS, finished_reason=reason)
    for source in PROMPT_SOURCES:
        vllm(PROMPT_TOKENS_BY_SOURCE, source=source)
    set_sleep_state(None)  # an instance starts awake


def set_sleep_state(level: int | None) -> None:
    """vllm:engine_sleep_state after a sleep or wake-up: awake 1 while fully awake (`level` None), else 0 and
    weights_offloaded (level 1) or discard_all (level 2) 1. Partly woken is still asleep at its level (vLLM's says
    awake after any wake_up)."""
    for state, on in zip(SLEEP_STATES, (level is None, level == 1, level == 2), strict=True):
        vllm(ENGINE_SLEEP_STATE, sleep_state=state).set(int(on))


def _one_two_five(limit: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's build_1_2_5_buckets, for TokenHistograms)."""
    out: list[int] = []
    scale = 1
    while True:
        for step in (1, 2, 5):
            if step * scale > limit:
                return tuple(float(v) for v in out)
            out.append(step * scale)
        scale *= 10


@dataclass(frozen=True)
class TokenHistograms:
    """vLLM's histograms of a request's token counts, whose buckets (1-2-5) run up to max_model_len: made with the
    instance's engine (engine_info), as vLLM makes them from its model config; observed in server/request_metrics.py."""

    prompt: Histogram  # vllm:request_prompt_tokens: its prompt's length
    generation: Histogram  # vllm:request_generation_tokens
    prefill_kv_computed: Histogram  # vllm:request_prefill_kv_computed_tokens: prompt tokens not cached nor loaded
    params_max_tokens: Histogram  # vllm:request_params_max_tokens
    max_num_generation: Histogram  # vllm:request_max_num_generation_tokens: per parent request

    @classmethod
    def make(cls, max_model_len: int, registry: CollectorRegistry = REGISTRY) -> TokenHistograms:
        def histogram(name: str, documentation: str) -> Histogram:
            return Histogram(name, documentation, LABELS, buckets=_one_two_five(max_model_len), registry=registry)

        return cls(histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed."),
                   histogram("vllm:request_generation_tokens", "Number of generation tokens processed."),
                   histogram("vllm:request_prefill_kv_computed_tokens", "Histogram of new KV tokens computed during "
                             "prefill (excluding cached tokens)."),
                   histogram("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter."),
                   histogram("vllm:request_max_num_generation_tokens", "Histogram of maximum number of requested "
                             "generation tokens."))

    def all(self) -> tuple[Histogram, ...]:
        return (self.prompt, self.generation, self.prefill_kv_computed, self.params_max_tokens,
                self.max_num_generation)


_engine_info_lock = threading.Lock()
_token_histograms: TokenHistograms | None = None  # made by engine_info()
CACHE_CONFIG_INFO: Gauge | None = None
CACHE_INFO_LABELS = ("block_size", "cache_dtype", "enable_prefix_caching", "gpu_memory_utilization",
                     "num_gpu_blocks", "num_gpu_blocks_override", "kv_offload_gb", "engine")


def engine_info(max_model_len: int, cache: dict[str, Any]) -> None:
    """vllm:cache_config_info (one series at 1, labelled with the cache settings, as vLLM's) and the
    TokenHistograms (buckets up to max_model_len). Once per engine; the series are made by the first engine of the
    process (its max_model_len sets the buckets; a served instance is a process of its own), later ones relabel
    cache_config_info."""
    global _token_histograms, CACHE_CONFIG_INFO
    with _engine_info_lock:
        if _token_histograms is None:
            _token_histograms = TokenHistograms.make(max_model_len)
            CACHE_CONFIG_INFO = Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                                      list(CACHE_INFO_LABELS))
        for histogram in _token_histograms.all():
            vllm(histogram)
        assert CACHE_CONFIG_INFO is not None
        CACHE_CONFIG_INFO.clear()
        labels = {k: str(cache.get(k)) for k in CACHE_INFO_LABELS}
        CACHE_CONFIG_INFO.labels(**{**labels, "engine": "0"}).set(1)


def token_histograms() -> TokenHistograms | None:
    """The TokenHistograms, None before an engine of this process made them (nothing to record them for)."""
    return _token_histograms


def vllm(metric: M, **extra: str) -> M:
    """`metric` labelled for this instance (`extra`: further labels, e.g. finished_reason)."""
    return metric.labels(model_name=_model_name, engine="0", **extra)


def count_prompt_sources(num_prompt: int, num_cached: int, num_external: int) -> None:
    """A request's prompt of `num_prompt` tokens, `num_cached` of them found in this instance's prefix cache and
    `num_external` loaded by its connector: the rest were computed here (with vLLM's recomputed last token)."""
    computed = max(0, num_prompt - num_cached - num_external)
    for source, count in zip(PROMPT_SOURCES, (computed, num_cached, num_external), strict=True):
        vllm(PROMPT_TOKENS_BY_SOURCE, source=source).inc(count)
    vllm(PROMPT_TOKENS_CACHED).inc(num_cached + num_external)
    # vLLM counts its num_cached + 1 == num_prompt, a one-token prompt too, which had nothing cached to recompute
    vllm(PROMPT_TOKENS_RECOMPUTED).inc(int(0 < num_cached + num_external == num_prompt - 1))
