"""kv_transfer_params models, signatures and expiry; NIXL notification parsing; the test-only fault hook."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.fault import ENV, TransferFaults
from pdlaunch.kv_transfer.notifications import Forget, PushFailed, ReadDone, encode_notification, parse_notification
from pdlaunch.kv_transfer.params import PrefillAnswer, RemoteDecodeRequest, check_kv_transfer_params, params_key
from tests.kv_transfer.deployment_secret import TEST_SECRET, signed

KEY = params_key(TEST_SECRET)
ANSWER = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "P", "remote_block_ids": [[1, 2]],
          "remote_host": "127.0.0.1", "remote_port": 7000, "remote_request_id": "r-1", "tp_size": 1,
          "kv_heads_per_rank": 2, "transfer_mode": "pull", "num_prompt_tokens": 9, "kv_epoch": 0}


def _check(raw: object, now: float | None = None, max_blocks: int = 64) -> RemoteDecodeRequest | PrefillAnswer | None:
    return check_kv_transfer_params(raw, KEY, max_blocks=max_blocks, lease_seconds=60.0,
                                    now=time.time() if now is None else now)


def _same(raw: dict[str, object]) -> bool:
    """`raw` parsed into the model its kind asks for, carrying exactly the fields `raw` has."""
    parsed = _check(raw)
    kind = PrefillAnswer if raw.get("do_remote_prefill") else RemoteDecodeRequest
    return isinstance(parsed, kind) and parsed.model_dump(exclude_unset=True) == raw


def _field(raw: object, **kw: object) -> str:
    with pytest.raises(KVTransferError) as info:
        _check(raw, **kw)  # type: ignore[arg-type]
    return str(info.value.field)


def test_signed_answers_pass_unchanged_and_requests_are_typed() -> None:
    good = signed(ANSWER)
    assert _same(good)
    assert _check(None) is None
    vllm_style = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                  "remote_block_ids": None, "remote_host": None, "remote_port": None}
    assert _same(vllm_style)
    assert _field({"do_remote_decode": "yes"}) == "kv_transfer_params.do_remote_decode"
    assert _field({"do_remote_decode": True, "remote_host": "10.0.0.1"}) == "kv_transfer_params.remote_host"
    assert _field([1]) == "kv_transfer_params"


@pytest.mark.parametrize("change, field", [
    ({"remote_block_ids": 5}, "remote_block_ids"),
    ({"tp_size": "abc"}, "tp_size"),
    ({"tp_size": True}, "tp_size"),
    ({"tp_size": 0}, "tp_size"),
    ({"remote_block_ids": [[1, 2**40]]}, "remote_block_ids"),
    ({"remote_block_ids": [list(range(65))]}, "remote_block_ids"),
    ({"remote_port": "7000"}, "remote_port"),
    ({"remote_engine_id": "x" * 600}, "remote_engine_id"),
    ({"remote_ports": [7000, 7001]}, ""),  # two ports for tp_size 1
    ({"surprise": 1}, "surprise"),
])
def test_bad_values_name_their_field(change: dict, field: str) -> None:
    assert _field(signed({**ANSWER, **change})) == "kv_transfer_params" + (f".{field}" if field else "")


def test_unsigned_forged_expired_and_overlong_params_are_refused() -> None:
    assert _field(ANSWER) == "kv_transfer_params.signature"
    nan = {**ANSWER, "remote_blocks_expiry_time": float("nan"), "signature": "00" * 32, "expires_at": 1}
    assert _field(nan) == "kv_transfer_params.remote_blocks_expiry_time"  # never reaches the JSON encoder
    good = signed(ANSWER)
    assert _field({**good, "remote_port": 7001}) == "kv_transfer_params.signature"
    assert _field({**good, "signature": "zz"}) == "kv_transfer_params.signature"
    assert _field(signed(ANSWER, secret="some-other-deployment-secret")) == "kv_transfer_params.signature"
    assert _field(signed(ANSWER, now=time.time() - 61)) == "kv_transfer_params.expires_at"
    assert _field(signed(ANSWER, lease_seconds=3600)) == "kv_transfer_params.expires_at"
    with pytest.raises(KVTransferError, match="no deployment secret"):
        check_kv_transfer_params(good, None, max_blocks=64, lease_seconds=60.0, now=time.time())


def test_notifications_are_typed_and_malformed_ones_dropped() -> None:
    assert parse_notification(b'{"kind":"read_done","request_id":"r","reader":"d","load":"l","readers":2}') == \
        ReadDone(kind="read_done", request_id="r", reader="d", load="l", readers=2)
    assert parse_notification(b'{"kind":"forget","agent_name":"a"}') == Forget(kind="forget", agent_name="a")
    sent = PushFailed(kind="push_failed", nonce="n1", error="boom")
    assert parse_notification(encode_notification(sent)) == sent
    for bad in (b"", b"\xff", b"[]", b'{"kind":"read_done"}',
                b'{"kind":"read_done","request_id":"r","reader":"d","readers":"x"}',
                b'{"kind":"read_done","request_id":"r","load":"l"}',  # no reader
                b'{"kind":"read_done","request_id":"r","reader":"d"}',  # no load (an older decode)
                b'{"kind":"forget","agent_name":"a","kv_epoch":-1}', b'{"kind":"boom"}', b'{"kind":"push_done"}'):
        assert parse_notification(bad) is None, bad


def test_fault_hook_fails_the_configured_fraction() -> None:
    assert TransferFaults({}).rate == 0.0
    always = TransferFaults({ENV: "1"})
    with pytest.raises(KVTransferError, match="injected by PDLAUNCH_TEST_FAIL_TRANSFER_RATE"):
        always.maybe_fail("r")
    some = TransferFaults({ENV: "0.25"})
    failures = 0
    for _ in range(4000):
        try:
            some.maybe_fail("r")
        except KVTransferError:
            failures += 1
    assert 800 < failures < 1200
    for bad in ("abc", "2", "nan", "-0.1"):
        with pytest.raises(KVTransferError, match=ENV):
            TransferFaults({ENV: bad})


_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(),
              st.text(max_size=20)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(change=st.dictionaries(st.sampled_from(sorted(ANSWER) + ["signature", "expires_at", "remote_ports",
                                                                "remote_hosts", "rank_kv_checksums", "x",
                                                                "remote_blocks_expiry_time", "remote_num_tokens"]),
                              _values, max_size=4),
       sign=st.booleans())
def test_random_values_fail_with_a_field_or_pass_signed(change: dict, sign: bool) -> None:
    """Whatever a client puts in kv_transfer_params: a KVTransferError naming a kv_transfer_params field,
    or (only when it is a genuine signed answer) acceptance; never another exception."""
    raw = {**ANSWER, **change}
    if sign:
        try:
            raw = signed(raw)
        except ValueError:  # NaN/inf cannot be signed (strict JSON): a prefill never emits them
            return
    try:
        assert _same(raw)
    except KVTransferError as e:
        assert str(e.field).startswith("kv_transfer_params")
    else:
        assert sign and raw["do_remote_prefill"] is True or raw.get("do_remote_prefill") in (None, False)
