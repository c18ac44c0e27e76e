"""Issue 32 without processes: the prefill deadline rule, the prefill leg abandoned and retried or
recomputed, the proxy's stalled state, the launcher's stall watch and what the supervisor shows and
does, and check-config's limits on the new fields."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.launcher_config import STALL_PROBE_INTERVAL_S
from pdlaunch.http.errors import OpenAIError
from pdlaunch.launcher.deployment import Deployment
from pdlaunch.launcher.stall_watch import StallWatch
from pdlaunch.launcher.supervisor import Supervisor
from pdlaunch.proxy.__main__ import parse_args
from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.proxy.prefill_leg import COLD_S, FLOOR_S, SLACK, PrefillDeadline, PrefillLegs, Recompute, prompt_chars
from pdlaunch.proxy.upstream import Proxy
from tests.config.cli_helpers import assert_invalid, check
from tests.serving.test_fault_tolerance_supervisor import FakeDeployment

# -- the deadline rule ---------------------------------------------------------------------------


def test_the_prefill_deadline_is_fixed_when_configured() -> None:
    deadline = PrefillDeadline(fixed_s=7.5)
    deadline.observe(100, 50.0)
    assert deadline.seconds_for(10) == deadline.seconds_for(100_000) == 7.5


def test_the_derived_prefill_deadline_grows_with_the_prompt_and_the_measured_time_per_character() -> None:
    deadline = PrefillDeadline()
    assert deadline.seconds_for(1000) == COLD_S  # nothing measured yet
    deadline.observe(1000, 0.5)  # 0.5 ms per character
    assert deadline.seconds_for(1000) == pytest.approx(FLOOR_S + SLACK * 0.5)
    assert deadline.seconds_for(100_000) == pytest.approx(FLOOR_S + SLACK * 50)
    assert deadline.seconds_for(10) == pytest.approx(FLOOR_S + SLACK * 0.005)  # short prompts: the floor
    deadline.observe(1000, 5.5)  # a slower leg (queueing) moves the average by ALPHA = 0.2
    assert deadline.seconds_per_char == pytest.approx(0.8 * 0.0005 + 0.2 * 0.0055)
    assert deadline.seconds_for(1000) == pytest.approx(FLOOR_S + SLACK * 1000 * (0.8 * 0.0005 + 0.2 * 0.0055))


def test_prompt_chars_counts_a_prompt_string_token_ids_and_chat_messages() -> None:
    assert prompt_chars({"prompt": "hello"}) == 5
    assert prompt_chars({"prompt": [1, 22, 333]}) == len("[1,22,333]")
    messages = [{"role": "user", "content": "hi"}]
    assert prompt_chars({"messages": messages}) == len('[{"role":"user","content":"hi"}]')
    assert prompt_chars({"prompt": ""}) == 1


# -- the prefill leg -----------------------------------------------------------------------------

ANSWER = {"choices": [{"text": "x", "finish_reason": "length"}], "kv_transfer_params": {"remote_request_id": "r"}}


def _proxy(stalled: set[str], policy: str = "recompute", timeout_s: float = 0.3) -> tuple[Proxy, PrefillLegs]:
    """Two ready prefills behind a transport where those named in `stalled` never answer."""
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host in stalled:
            await asyncio.sleep(60)
        return httpx.Response(200, json={**ANSWER, "served_by": request.url.host})

    pool = InstancePool([Instance("prefill", "http://p0", "prefill-0", state="ready"),
                         Instance("prefill", "http://p1", "prefill-1", state="ready"),
                         Instance("decode", "http://d0", "decode-0", state="ready")])
    proxy = Proxy(pool, request_timeout_s=30)
    proxy.client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return proxy, PrefillLegs(proxy, PrefillDeadline(timeout_s), recompute=policy == "recompute")


def _retried(proxy: Proxy, reason: str) -> float:
    return proxy.metrics.registry.get_sample_value("pdlaunch_proxy_legs_retried_total",
                                                   {"role": "prefill", "reason": reason}) or 0.0


async def _run(legs: PrefillLegs, first: int = 0) -> Any:
    pool = legs.pool
    return await legs.run(pool.instances[first], "/v1/completions", {"prompt": "p"}, {"X-Request-Id": "r"},
                          asyncio.get_running_loop().time() + 30, chars=1)


def test_a_prefill_leg_past_its_deadline_is_abandoned_and_retried_on_the_other_prefill() -> None:
    proxy, legs = _proxy(stalled={"p0"})
    prefill, answer = asyncio.run(_run(legs))
    assert prefill.name == "prefill-1" and answer["served_by"] == "p1"
    assert _retried(proxy, "stalled") == 1 and _retried(proxy, "recompute") == 0
    assert [i.in_flight for i in proxy.pool.instances] == [0, 0, 0]  # the abandoned leg's count went back


def test_a_prefill_leg_is_abandoned_as_soon_as_the_health_probe_marks_its_instance_stalled() -> None:
    proxy, legs = _proxy(stalled={"p0"}, timeout_s=60)
    stalled = proxy.pool.instances[0]

    async def run() -> tuple[Any, float]:
        loop = asyncio.get_running_loop()
        loop.call_later(0.2, proxy.pool.mark_stalled, stalled, "/health did not answer within 2s")
        started = loop.time()
        answered = await _run(legs)
        return answered, loop.time() - started

    (prefill, _), seconds = asyncio.run(run())
    assert prefill.name == "prefill-1" and seconds < 30  # not the 60 s deadline
    assert _retried(proxy, "stalled") == 1 and stalled.in_flight == 0


def test_when_no_prefill_answers_in_time_the_decode_computes_the_prompt_under_policy_recompute() -> None:
    proxy, legs = _proxy(stalled={"p0", "p1"})
    assert asyncio.run(_run(legs)) == Recompute("stalled")
    assert _retried(proxy, "stalled") == 1 and _retried(proxy, "recompute") == 1


def test_under_policy_fail_a_stalled_prefill_leg_is_a_504_naming_the_stall() -> None:
    proxy, legs = _proxy(stalled={"p0", "p1"}, policy="fail")
    with pytest.raises(OpenAIError) as raised:
        asyncio.run(_run(legs))
    assert raised.value.status == 504 and raised.value.code == "prefill_stalled"
    message = str(raised.value.body()["error"]["message"])
    assert "prefill-0 did not answer the prefill leg within 0.3s" in message and "prefill-1" in message
    assert "kv_transfer.load_failure_policy: fail" in message


def test_a_leg_that_answers_in_time_is_measured_for_the_derived_deadline() -> None:
    proxy, legs = _proxy(stalled=set(), timeout_s=0.3)
    legs.deadline = PrefillDeadline()
    asyncio.run(_run(legs))
    assert legs.deadline.seconds_per_char is not None and _retried(proxy, "stalled") == 0


# -- the proxy's health probe --------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [httpx.ReadTimeout, httpx.ConnectTimeout])
def test_a_health_probe_that_times_out_marks_the_instance_stalled_until_it_answers_again(
        timeout: type[httpx.TimeoutException]) -> None:
    """A read that gets no answer, or a connect that is never accepted (a stopped process whose listen backlog is
    full, as under client traffic), is a stall, not a dead instance."""
    answering = {"yes": False}

    async def handler(request: httpx.Request) -> httpx.Response:
        if not answering["yes"]:
            raise timeout("no answer", request=request)
        return httpx.Response(200, json={"status": "ok", "engine_id": "E"})

    instance = Instance("prefill", "http://p0", "prefill-0", state="ready", engine_id="E")
    pool = InstancePool([instance, Instance("decode", "http://d0", "decode-0", state="ready")],
                        health_timeout_s=0.5)
    proxy = Proxy(pool, request_timeout_s=30)

    async def probe() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await pool._check(client, instance)  # noqa: SLF001

    asyncio.run(probe())
    asyncio.run(probe())
    assert instance.state == "stalled" and "within 0.5s" in instance.detail
    assert proxy.metrics.registry.get_sample_value("pdlaunch_proxy_stalls_detected_total", {"role": "prefill"}) == 1
    with pytest.raises(OpenAIError, match="prefill-0 stalled"):
        pool.pick("prefill")
    answering["yes"] = True
    asyncio.run(probe())
    assert instance.state == "ready" and pool.pick("prefill") is instance


# -- the launcher --------------------------------------------------------------------------------


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def endpoints() -> Iterator[dict[str, str]]:
    """/health URLs: one that answers, one that accepts but never answers (a stopped process), one refused."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    try:
        yield {"answers": f"http://127.0.0.1:{server.server_address[1]}/health",
               "silent": f"http://127.0.0.1:{silent.getsockname()[1]}/health",
               "refused": f"http://127.0.0.1:{refused.getsockname()[1]}/health"}
    finally:
        server.shutdown()
        server.server_close()
        silent.close()
        refused.close()


def test_the_stall_watch_tells_a_silent_process_from_an_answering_or_a_gone_one(endpoints: dict[str, str]) -> None:
    now = [100.0]
    watch = StallWatch(endpoints, timeout_s=0.3, clock=lambda: now[0])
    try:
        for name in endpoints:
            watch.watch(name, True)
            watch.probe(name)
        now[0] = 102.0
        assert watch.stalled_for("silent") == pytest.approx(2.0)
        assert watch.stalled_for("answers") is None and watch.stalled_for("refused") is None
        watch.watch("silent", False)  # dead or restarting: its stall is forgotten
        assert watch.stalled_for("silent") is None
    finally:
        watch.stop()


class _LateOnce(BaseHTTPRequestHandler):
    """/health 200, the first answer 2.5 s late (a GC pause, a starved CPU), every later one at once."""

    protocol_version = "HTTP/1.1"
    late = [2.5]

    def log_message(self, *_: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.late:
            time.sleep(self.late.pop())
        data = json.dumps({"status": "ok"}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the probe timed out and closed its end


@pytest.fixture()
def late_once() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _LateOnce)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/health"
    finally:
        server.shutdown()
        server.server_close()


def test_one_late_health_answer_is_not_a_stall_worth_a_kill(late_once: str) -> None:
    stall_restart_s = 2.5  # what Supervisor._check_stall compares stalled_for with; health_timeout_seconds: 2
    watch = StallWatch({"decode-0": late_once}, timeout_s=2.0)
    watch.watch("decode-0", True)
    watch.start()
    try:
        worst = 0.0
        deadline = time.monotonic() + 8.0  # the late answer, then several prompt ones
        while time.monotonic() < deadline:
            worst = max(worst, watch.stalled_for("decode-0") or 0.0)
            time.sleep(0.05)  # the supervisor's tick looks about this often (SUPERVISE_POLL_S 0.2)
        assert worst < stall_restart_s, (f"one late answer read as stalled for {worst:.1f}s: a supervisor with "
                                         f"stall_restart_seconds {stall_restart_s} kills the healthy instance")
    finally:
        watch.stop()


class _HungAndLateOnce(BaseHTTPRequestHandler):
    """/hung never answers (until the test ends); /late lets its 2nd probe time out (a GC pause) and answers its 3rd
    0.7 s late, still within the 1 s timeout; every other at once."""

    protocol_version = "HTTP/1.1"
    late_probes: list[int] = [0]
    released = threading.Event()

    def log_message(self, *_: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.startswith("/hung"):
            self.released.wait(30.0)
            return
        self.late_probes[0] += 1
        time.sleep({2: 1.3, 3: 0.7}.get(self.late_probes[0], 0.0))
        try:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
        except OSError:
            pass  # the probe timed out and closed its end


def test_a_hung_peer_does_not_delay_the_probes_of_a_live_one_past_the_check_config_floor() -> None:
    """check-config's floor (stall_restart_seconds above health_timeout + the probe interval) holds only while each
    process is probed on its own schedule: probed one after another, the live one's next probe waited for the hung
    one's timeout, and one slow answer read as a stall of 2 x timeout + interval, killing a live instance."""
    timeout_s = 1.0
    floor = timeout_s + STALL_PROBE_INTERVAL_S  # config/rules/roles.py stall_restart_problems
    _HungAndLateOnce.late_probes[0] = 0
    _HungAndLateOnce.released.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HungAndLateOnce)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    watch = StallWatch({"live": f"{base}/late", "hung": f"{base}/hung"}, timeout_s=timeout_s)
    watch.watch("live", True)
    watch.watch("hung", True)
    watch.start()
    try:
        worst = 0.0
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline and _HungAndLateOnce.late_probes[0] < 5:  # the late answers, then more
            worst = max(worst, watch.stalled_for("live") or 0.0)
            time.sleep(0.02)
        assert _HungAndLateOnce.late_probes[0] >= 5, "the live process was not probed again"
        assert watch.stalled_for("hung") is not None  # the hung one is a stall
        assert 0 < worst <= floor, (f"one probe timed out and the next answered in 0.7s: read as a stall of "
                                    f"{worst:.2f}s, past check-config's floor of {floor:g}s: a "
                                    f"stall_restart_seconds it accepts would kill the live one")
    finally:
        watch.stop()
        _HungAndLateOnce.released.set()
        server.shutdown()
        server.server_close()


@pytest.fixture()
def supervised(tmp_path: Path) -> Iterator[Any]:
    made: list[Any] = []

    def build(**data: Any) -> tuple[FakeDeployment, Any]:
        cfg = DeploymentConfig.model_validate({"device": "cpu", "proxy": {"port": 0}, **data})
        deployment = FakeDeployment(cfg, tmp_path)
        lines: list[str] = []
        supervisor = Supervisor(deployment, deployment.console)
        supervisor._say = lines.append  # type: ignore[method-assign]  # noqa: SLF001
        supervisor.lines = lines
        made.append(supervisor)
        return deployment, supervisor

    yield build
    for supervisor in made:
        supervisor.__exit__()


def _stalled(supervisor: Any, stalls: dict[str, float]) -> None:
    supervisor.stall_watch.stalled_for = stalls.get


def test_the_supervisor_shows_a_stalled_instance_apart_from_a_dead_one_and_takes_it_back(supervised: Any) -> None:
    deployment, supervisor = supervised()
    _stalled(supervisor, {"prefill-0": 2.5})
    supervisor.tick(now=10.0)
    assert deployment.rows["prefill-0"].state == "stalled" and deployment.rows["decode-0"].state == "ready"
    assert any("prefill-0 (pid 1000) is stalled: alive, but /health has not answered within 2s" in line
               and "left running (supervision.stall_restart_seconds is unset)" in line for line in supervisor.lines)
    _stalled(supervisor, {"prefill-0": 500.0})
    supervisor.tick(now=500.0)
    assert deployment.instances[0].signals == []  # restarts for stalls are off by default
    _stalled(supervisor, {})
    supervisor.tick(now=501.0)
    assert deployment.rows["prefill-0"].state == "ready"
    assert any("prefill-0 (pid 1000) answers /health again" in line for line in supervisor.lines)


def test_a_stall_longer_than_stall_restart_seconds_kills_the_instance_and_it_is_restarted(supervised: Any) -> None:
    deployment, supervisor = supervised(supervision={"stall_restart_seconds": 30, "restart_backoff_seconds": 1})
    decode = deployment.instances[1]
    _stalled(supervisor, {"decode-0": 10.0})
    supervisor.tick(now=10.0)
    assert decode.signals == [] and deployment.rows["decode-0"].state == "stalled"
    _stalled(supervisor, {"decode-0": 31.0})
    supervisor.tick(now=31.0)
    assert decode.signals == [signal.SIGKILL]
    assert any("stalled for 31s (supervision.stall_restart_seconds: 30); killing it" in line
               for line in supervisor.lines)
    decode.code = -9  # what SIGKILL does
    _stalled(supervisor, {})
    supervisor.tick(now=31.5)
    assert deployment.rows["decode-0"].state == "restarting (1)"
    # its exit says SIGKILL; what the user has to look at is the stall (and a give-up names it as the cause)
    stalled = "was stalled for 31s (no /health answer; supervision.stall_restart_seconds: 30) and killed to restart it"
    assert any(f"decode-0 (pid {decode.pid}) {stalled}; restart 1" in line for line in supervisor.lines)
    record = next(r for _, r in supervisor.records if r.name == "decode-0")
    assert record.outage_cause == stalled and record.killed_for == ""
    supervisor.tick(now=33.0)
    assert deployment.restarted == [("decode-0", 1, "planned-decode-0-r1")]


# -- check-config ----------------------------------------------------------------------------------


def test_check_config_refuses_stall_timeouts_out_of_range(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("proxy: {request_timeout_seconds: 10, health_timeout_seconds: 10, prefill_timeout_seconds: 20}\n"
                      "supervision: {stall_restart_seconds: 0}\n")
    result = check([str(config), "--model", "tiny", "--device", "cpu"])
    assert_invalid(result, "proxy.health_timeout_seconds", "not below proxy.request_timeout_seconds (10s)")
    assert_invalid(result, "proxy.prefill_timeout_seconds", "not below proxy.request_timeout_seconds (10s)")
    config.write_text("supervision: {stall_restart_seconds: 0}\nproxy: {health_timeout_seconds: 61}\n")
    result = check([str(config), "--model", "tiny", "--device", "cpu"])
    assert_invalid(result, "supervision.stall_restart_seconds")
    assert_invalid(result, "proxy.health_timeout_seconds")


# -- what the launcher hands the proxy ---------------------------------------------------------------


def test_the_proxy_gets_the_stall_settings_from_the_config(tmp_path: Path) -> None:
    def argv_of(**data: Any) -> list[str]:
        cfg = DeploymentConfig.model_validate({"device": "cpu", "model": {"path": "tiny"}, "proxy": {"port": 0},
                                               **data})
        return Deployment(cfg, log_dir=tmp_path)._proxy_argv()  # noqa: SLF001

    argv = argv_of(proxy={"port": 0, "health_timeout_seconds": 1.5, "prefill_timeout_seconds": 12},
                   kv_transfer={"load_failure_policy": "fail"})
    args = parse_args(argv[3:])  # past `python -m pdlaunch.proxy`
    assert (args.health_timeout, args.prefill_timeout, args.load_failure_policy) == (1.5, 12.0, "fail")
    args = parse_args(argv_of()[3:])
    assert (args.health_timeout, args.prefill_timeout, args.load_failure_policy) == (2.0, None, "recompute")
    with pytest.raises(SystemExit):
        parse_args([*argv_of()[3:], "--health-timeout", "0"])


def test_the_blocks_column_does_not_ask_a_stalled_instance(supervised: Any) -> None:
    """A stalled instance's /info would hold the supervisor's pass (and the status rows) for its whole timeout."""
    deployment, supervisor = supervised()
    refreshed: list[str] = []
    deployment.refresh_blocks = lambda name, timeout=1.0: refreshed.append(name)
    _stalled(supervisor, {"prefill-0": 2.5})
    supervisor.tick(now=10.0)
    assert deployment.rows["prefill-0"].state == "stalled"
    assert "decode-0" in refreshed and "prefill-0" not in refreshed
    refreshed.clear()
    _stalled(supervisor, {})
    supervisor.tick(now=20.0)
    assert "prefill-0" in refreshed


def test_a_stalled_instance_with_no_other_of_its_role_is_not_said_routed_around(supervised: Any) -> None:
    """1P1D, the one decode SIGSTOPped: the line said `the proxy routes around it` while every request waited on it
    or was refused; with a second decode it does route around it."""
    _, supervisor = supervised()
    _stalled(supervisor, {"decode-0": 2.5})
    supervisor.tick(now=10.0)
    said = next(line for line in supervisor.lines if "decode-0 (pid 1000) is stalled" in line)
    assert "routes around" not in said
    assert "no other decode instance is ready, so the proxy has none to send its requests to until it answers" in said
    _, supervisor = supervised(instances=[{"role": "prefill"}, {"role": "decode", "count": 2}])
    _stalled(supervisor, {"decode-1": 2.5})
    supervisor.tick(now=10.0)
    said = next(line for line in supervisor.lines if "decode-1 (pid 1000) is stalled" in line)
    assert "the proxy routes around it" in said
    _stalled(supervisor, {"decode-1": 3.5, "decode-0": 2.5})  # then the other one too
    supervisor.tick(now=11.0)
    said = next(line for line in supervisor.lines if "decode-0 (pid 1000) is stalled" in line)
    assert "no other decode instance is ready" in said


def test_check_config_refuses_a_stall_restart_that_one_slow_probe_reaches(tmp_path: Path) -> None:
    """A stall counts from a probe's timeout; the next probe comes 1 s later and may take health_timeout_seconds:
    one slow answer reads as a stall that long, and a stall_restart_seconds not above it kills a live instance."""
    config = tmp_path / "c.yaml"
    config.write_text("supervision: {stall_restart_seconds: 3}\n")  # proxy.health_timeout_seconds: 2 (default)
    result = check([str(config), "--model", "tiny", "--device", "cpu"])
    assert_invalid(result, "supervision.stall_restart_seconds", "cannot tell a stall from one slow /health answer")
    assert "proxy.health_timeout_seconds: 2s" in result.output, result.output
    assert "set supervision.stall_restart_seconds above 3" in result.output, result.output
    assert "lower proxy.health_timeout_seconds below 2" in result.output, result.output
    config.write_text("supervision: {stall_restart_seconds: 3}\nproxy: {health_timeout_seconds: 1.5}\n")
    assert check([str(config), "--model", "tiny", "--device", "cpu"]).exit_code == 0
