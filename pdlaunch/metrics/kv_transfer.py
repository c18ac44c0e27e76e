"""Our series of KV transfer between instances (`pdlaunch_kv_*`): what moved and how long it took, transfers
that failed, a prefill's held KV freed other than by its reader, and a decode's prompt computed locally instead.
A transfer is counted in vLLM's NixlConnector series too (vllm_series.py): `observe_kv_transfer`,
`count_kv_transfer_failure`. A decode of TP > 1 counts each request once, on rank 0, with every rank's bytes
(distributed/tp_connector.py): ranks 1..T-1 run in worker processes whose series nobody serves.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Histogram

from pdlaunch.metrics.vllm_series import NIXL_BYTES_TRANSFERRED, NIXL_NUM_FAILED_TRANSFERS, NIXL_XFER_TIME, vllm

logger = logging.getLogger(__name__)

KV_TRANSFER_BYTES = Counter("pdlaunch_kv_transfer_bytes", "KV bytes moved between instances")
KV_TRANSFER_SECONDS = Histogram(
    "pdlaunch_kv_transfer_seconds", "Time of one request's KV load on a decode, end to end: from its start until its "
    "KV was in, the handshake with the prefill and the READ claim's or push request's round trip included (TP: the "
    "slowest rank's); vllm:nixl_xfer_time_seconds times the data movement alone",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
KV_TRANSFER_FAILURES = Counter("pdlaunch_kv_transfer_failures", "KV transfers that failed")
KV_EXPIRED_REQUESTS = Counter("pdlaunch_kv_expired_requests", "Held KV freed by lease expiry")
KV_CLAIM_CAP_FREES = Counter(
    "pdlaunch_kv_claim_cap_frees", "Held KV a decode's READ claimed, freed at that claim's hard cap: the READ's "
    "read_done/release never came (the decode died or timed out, or the notification was lost)")
KV_DEAD_READER_FREES = Counter(
    "pdlaunch_kv_dead_reader_frees", "Held KV freed because the decode engine reading or pushed it died (its "
    "launcher asked this prefill to forget that engine) and no other decode was at it")
KV_LOAD_RECOMPUTES = Counter(
    "pdlaunch_kv_load_recomputes", "Requests whose KV could not be loaded and that computed their prompt "
    "locally instead (kv_transfer.load_failure_policy: recompute)")
DECODE_PREFIX_HIT_TOKENS = Counter(
    "pdlaunch_decode_prefix_hit_tokens", "Prompt tokens of requests whose KV comes from a prefill that this "
    "instance found in its own prefix cache: their KV was not moved")


def observe_kv_transfer(num_bytes: int, load_seconds: float, xfer_seconds: float | None) -> None:
    """One request's KV arrived (`num_bytes`, over every TP rank): ours, with the load's end-to-end time
    (`load_seconds`), and vLLM's NIXL series, with the data movement's (`xfer_seconds`: from the transfer's post
    until it completed, as vLLM times it; None when nothing was posted, e.g. every block was a prefix hit, which
    vLLM does not count as a transfer either)."""
    KV_TRANSFER_BYTES.inc(num_bytes)
    KV_TRANSFER_SECONDS.observe(load_seconds)
    if xfer_seconds is not None:
        vllm(NIXL_BYTES_TRANSFERRED).observe(num_bytes)
        vllm(NIXL_XFER_TIME).observe(xfer_seconds)


def count_expired_recompute(request_id: str) -> None:
    """Request `request_id`, whose kv_transfer_params had expired (params.py `params_expired`), was queued: it computes
    its prompt locally. Counted once, where it is queued (LLMEngine.add_request for raw params; the server's engine
    thread after it), not where its params are parsed: a request refused after that, or params parsed again to
    release their hold, compute nothing."""
    KV_LOAD_RECOMPUTES.inc()
    logger.warning("request %s: its kv_transfer_params had expired; computing the prompt here "
                   "(kv_transfer.load_failure_policy: recompute)", request_id)


def count_kv_transfer_failure() -> None:
    """One request's KV load failed (on any TP rank: counted once, on rank 0)."""
    KV_TRANSFER_FAILURES.inc()
    vllm(NIXL_NUM_FAILED_TRANSFERS).inc()
