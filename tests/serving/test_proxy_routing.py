"""Proxy building blocks: routing policies, PD request translation, upstream error mapping."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from pdlaunch.http.errors import OpenAIError
from pdlaunch.proxy.app import instance_transports
from pdlaunch.proxy.instances import Instance, InstancePool, LeastLoaded, RoundRobin
from pdlaunch.proxy.load_board import IN_FLIGHT
from pdlaunch.proxy.retry import on_live_instance
from pdlaunch.proxy.translate import (
    DroppedConnection,
    decode_body,
    error_from_exception,
    error_from_response,
    kv_params_of,
    parse_client_body,
    prefill_body,
)


def _instances(role: str, n: int) -> list[Instance]:
    return [Instance(role=role, url=f"http://127.0.0.1:{9000 + i}", name=f"{role}-{i}", state="ready")
            for i in range(n)]


def test_round_robin_cycles_per_role() -> None:
    policy, prefill, decode = RoundRobin(), _instances("prefill", 3), _instances("decode", 2)
    assert [policy.choose("prefill", prefill).name for _ in range(4)] == ["prefill-0", "prefill-1", "prefill-2",
                                                                          "prefill-0"]
    assert [policy.choose("decode", decode).name for _ in range(3)] == ["decode-0", "decode-1", "decode-0"]


def test_least_loaded_picks_fewest_in_flight_and_shares_ties() -> None:
    policy, decode = LeastLoaded(), _instances("decode", 3)
    for instance, legs in zip(decode, (2, 0, 1), strict=True):
        instance.count(IN_FLIGHT, legs)
    assert policy.choose("decode", decode).name == "decode-1"
    decode[1].count(IN_FLIGHT, 2)
    assert policy.choose("decode", decode).name == "decode-2"
    decode[2].count(IN_FLIGHT, 1)
    assert {policy.choose("decode", decode).name for _ in range(3)} == {"decode-0", "decode-1", "decode-2"}


@pytest.mark.parametrize("policy", [RoundRobin(), LeastLoaded()], ids=["round_robin", "least_loaded"])
def test_a_policy_asked_to_choose_among_no_instance_answers_a_503(policy: RoundRobin | LeastLoaded) -> None:
    """Callers find the ready instances first, but the health probe may mark the last one down before the choice (a
    stall migration did: migrate.py): RoundRobin raised ZeroDivisionError, LeastLoaded ValueError (min of nothing),
    a 500 with a traceback. Now a 503 no_instance naming the role."""
    with pytest.raises(OpenAIError) as raised:
        policy.choose("decode", [])
    assert (raised.value.status, raised.value.code) == (503, "no_instance")
    assert "no ready decode instance" in str(raised.value)


def test_lease_counts_in_flight_even_on_error() -> None:
    inst = _instances("decode", 1)[0]
    with pytest.raises(RuntimeError):
        with inst.lease():
            assert inst.in_flight == 1
            raise RuntimeError("leg failed")
    assert inst.in_flight == 0


def test_pool_skips_instances_that_are_not_ready_and_says_why() -> None:
    prefill, decode = _instances("prefill", 2), _instances("decode", 1)
    pool = InstancePool(prefill + decode, "least_loaded")
    pool.mark_down(prefill[0], "connection refused")
    assert {pool.pick("prefill").name for _ in range(3)} == {"prefill-1"}
    assert pool.ready()
    decode[0].state = "starting"
    assert not pool.ready()
    with pytest.raises(OpenAIError) as err:
        pool.pick("decode")
    assert err.value.status == 503 and "decode-0 starting" in err.value.message


def test_colocated_pool_needs_only_the_colocated_role() -> None:
    pool = InstancePool(_instances("colocated", 1))
    assert pool.colocated and pool.required_roles() == ["colocated"] and pool.ready()
    with pytest.raises(ValueError):
        InstancePool([], "random")


def test_prefill_leg_asks_for_one_token_and_remote_decode() -> None:
    body = {"model": "m", "prompt": "hi", "max_tokens": 50, "stream": True, "stream_options": {"include_usage": True},
            "temperature": 0.0}
    leg = prefill_body(body, chat=False)
    assert leg == {"model": "m", "prompt": "hi", "max_tokens": 1, "stream": False, "temperature": 0.0,
                   "kv_transfer_params": {"do_remote_decode": True}}
    assert body["max_tokens"] == 50 and body["stream"] is True  # the client's request is untouched
    chat = prefill_body({"messages": [], "max_completion_tokens": 9}, chat=True)
    assert chat["max_completion_tokens"] == 1 and chat["max_tokens"] == 1


def test_decode_leg_is_the_original_request_plus_kv_params() -> None:
    params = {"do_remote_prefill": True, "remote_block_ids": [[1, 2]], "remote_engine_id": "p"}
    assert decode_body({"prompt": "hi", "stream": True}, params) == {
        "prompt": "hi", "stream": True, "kv_transfer_params": params}


def test_prefill_answer_without_kv_params_is_a_502() -> None:
    inst = _instances("prefill", 1)[0]
    assert kv_params_of(inst, {"kv_transfer_params": {"remote_engine_id": "p"}}) == {"remote_engine_id": "p"}
    for answer in ({}, {"kv_transfer_params": None}, [], {"kv_transfer_params": {}}):
        with pytest.raises(OpenAIError) as err:
            kv_params_of(inst, answer)
        assert err.value.status == 502 and "prefill-0" in err.value.message


def test_client_body_must_be_a_json_object() -> None:
    assert parse_client_body(b'{"prompt": "x"}', chat=False) == {"prompt": "x"}
    for raw in (b"not json", b"[1, 2]", b"\xff", b"[" * 1000 + b"]" * 1000, b'{"a": ' + b"9" * 5000 + b"}"):
        with pytest.raises(OpenAIError) as err:
            parse_client_body(raw, chat=False)
        assert err.value.status == 400 and err.value.param == "body"


def test_instance_answers_map_to_client_statuses() -> None:
    inst = _instances("decode", 1)[0]
    bad = b'{"error": {"message": "max_tokens: too small", "param": "max_tokens", "code": "400"}}'
    err = error_from_response(inst, 400, bad)
    assert (err.status, err.param, err.message) == (400, "max_tokens", "max_tokens: too small")
    assert error_from_response(inst, 503, b'{"error": {"message": "overloaded"}}').status == 503
    crashed = error_from_response(inst, 500, b"Internal Server Error")
    assert crashed.status == 502 and "decode-0" in crashed.message and "Internal Server Error" in crashed.message


def test_transport_failures_map_to_503_502_504() -> None:
    inst = _instances("prefill", 1)[0]
    assert error_from_exception(inst, httpx.ConnectError("refused"), 30).status == 503
    assert error_from_exception(inst, httpx.RemoteProtocolError("peer closed"), 30).status == 502
    timeout = error_from_exception(inst, httpx.ReadTimeout("slow"), 30)
    assert timeout.status == 504 and "proxy.request_timeout_seconds" in timeout.message
    for err in (error_from_exception(inst, httpx.ReadError("x"), 1), error_from_response(inst, 500, b"")):
        body = err.body()["error"]
        assert set(body) == {"message", "type", "param", "code"}


def test_a_dropped_connection_is_told_from_an_error_answer() -> None:
    inst = _instances("decode", 1)[0]
    for exc in (httpx.ReadError(""), httpx.RemoteProtocolError("Server disconnected"), httpx.WriteError("x")):
        dropped = error_from_exception(inst, exc, 30)
        assert isinstance(dropped, DroppedConnection) and (dropped.status, dropped.code) == (502, "instance_failed")
    assert not isinstance(error_from_response(inst, 500, b"Internal Server Error"), DroppedConnection)
    assert not isinstance(error_from_exception(inst, httpx.DecodingError("bad gzip"), 30), DroppedConnection)


def _calls(pool: InstancePool, first: Instance, failure: OpenAIError) -> tuple[list[str], str | OpenAIError]:
    """The instances a leg was sent to, and what `on_live_instance` gave: the first fails with `failure`."""
    sent: list[str] = []

    async def call(instance: Instance) -> str:
        sent.append(instance.name)
        if instance is first:
            raise failure
        return "answer"

    async def run() -> str | OpenAIError:
        try:
            return (await on_live_instance(pool, "decode", first, call))[1]
        except OpenAIError as exc:
            return exc
    return sent, asyncio.run(run())


def test_a_dropped_leg_goes_to_another_instance_even_when_a_probe_marked_its_own_ready_again() -> None:
    """CI flake: decode-0 dropped a pooled keep-alive connection; a /health answer that arrived in between
    marked it ready again, and the leg's 502 reached the client instead of going to decode-1."""
    decode = _instances("decode", 2)
    pool = InstancePool(decode, "round_robin")
    dropped = error_from_exception(decode[0], httpx.ReadError(""), 30)
    assert decode[0].state == "ready"  # as the probe left it
    assert _calls(pool, decode[0], dropped) == (["decode-0", "decode-1"], "answer")
    answered = error_from_response(decode[0], 500, b"Internal Server Error")  # the instance's word: not retried
    assert _calls(pool, decode[0], answered) == (["decode-0"], answered)


def test_each_instance_gets_a_connection_pool_of_its_own() -> None:
    """IPv4 and IPv6 addresses, and a URL without a port (a Kubernetes Service on port 80): each instance's
    requests go through its own transport (a port-less URL once crashed the proxy's start: `host:None`)."""
    urls = ["http://127.0.0.1:8100", "http://127.0.0.1:8200", "http://[::1]:8300", "http://decode.svc"]
    pool = InstancePool([Instance(role="decode", url=url, name=f"decode-{i}", state="ready")
                         for i, url in enumerate(urls)], "round_robin")
    transports = instance_transports(pool, httpx.Limits())
    assert sorted(transports) == sorted(urls)
    client = httpx.AsyncClient(mounts=transports)
    used = [client._transport_for_url(httpx.URL(url + "/v1/completions")) for url in urls]  # httpx's own routing
    assert all(t is transports[url] for t, url in zip(used, urls))
