"""vllm:nixl_xfer_time_seconds times a load's data movement, as vLLM's NixlConnector does: from when its transfer
was posted (decode's READ, or the push request the prefill WRITEs on) until it completed. It used to be timed from
start_load, the handshake and the READ claim's or push request's round trips included; pdlaunch_kv_transfer_seconds
keeps that end-to-end time (its HELP says so)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from pdlaunch.kv_transfer.params import RemoteDecodeRequest
from pdlaunch.kv_transfer.prefill.side import PrefillSide
from pdlaunch.metrics.kv_transfer import KV_TRANSFER_BYTES, KV_TRANSFER_SECONDS
from pdlaunch.metrics.vllm_series import NIXL_BYTES_TRANSFERRED, NIXL_XFER_TIME, vllm
from tests.kv_transfer.pd_procs import make_spec
from tests.kv_transfer.test_nixl_local import _connector, _wait

HANDSHAKE_DELAY = 1.0  # the prefill answers the handshake this late: a load's end-to-end time, not its transfer's


def _sums() -> tuple[float, float, float, float, float]:
    xfer, moved = vllm(NIXL_XFER_TIME), vllm(NIXL_BYTES_TRANSFERRED)
    return (
        KV_TRANSFER_SECONDS._sum.get(),
        xfer._sum.get(),
        sum(b.get() for b in xfer._buckets),
        moved._sum.get(),
        KV_TRANSFER_BYTES._value.get(),
    )


@pytest.fixture
def slow_handshake(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    answer = PrefillSide._on_handshake

    def late(self: PrefillSide, message: object) -> object:
        time.sleep(HANDSHAKE_DELAY)
        return answer(self, message)  # type: ignore[arg-type]

    monkeypatch.setattr(PrefillSide, "_on_handshake", late)
    yield


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_the_vllm_series_time_the_transfer_and_ours_the_whole_load(slow_handshake: None, mode: str) -> None:
    prefill = _connector("prefill", f"xfer-P-{mode}")
    decode = _connector("decode", f"xfer-D-{mode}", transfer_mode=mode, handshake_timeout_seconds=10.0)
    try:
        prefill.register_kv_caches(make_spec(seed=1))
        decode.register_kv_caches(make_spec(seed=2))
        prompt = list(range(13))  # 3 blocks of 4 and the last token, computed on decode
        _, params = prefill.request_finished("r", prompt, RemoteDecodeRequest(do_remote_decode=True), [[1, 2, 3, 4]])
        before = _sums()
        decode.start_load("r", prompt, params, [[5, 6, 7, 8]], 0, 12)
        assert "r" in _wait(decode, lambda e: "r" in e.finished_recving or "r" in e.failed_recving).finished_recving
        load_s, xfer_s, xfer_count, vllm_bytes, ours_bytes = (a - b for a, b in zip(_sums(), before, strict=True))
        assert ours_bytes == vllm_bytes == 3 * decode.spec.block_bytes[0]
        assert xfer_count == 1
        assert load_s >= HANDSHAKE_DELAY  # ours: from start_load, the handshake included
        assert xfer_s < HANDSHAKE_DELAY / 2  # vLLM's: the transfer alone
    finally:
        decode.shutdown()
        prefill.shutdown()
