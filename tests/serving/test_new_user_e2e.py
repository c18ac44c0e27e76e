"""What a new user meets (issue 33), on one 1P1D `pdlaunch serve` of the tiny model on CPU: an idle
deployment costs ~no CPU, a smoke run beside it leaves its files alone, the numbers the client sees
are its own, unknown request fields are named in the log, vLLM's series are all there, the status
table follows the KV blocks, and Ctrl-C ends an open stream with an event instead of a broken
connection. The last test stops the deployment.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pdlaunch.launcher.ports import PortAllocator
from tests.serving.e2e import Serve, alive, wait_gone
from tests.serving.helpers import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BLOCK = 8
IDLE_WINDOW_S = 10.0
IDLE_CPU_LIMIT = 0.05  # of one core, per instance process
CLK_TCK = os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    deployment = Serve(tmp_path_factory.mktemp("new-user"), [
        "--model", "tiny", "--prefill", "1", "--decode", "1", "--num-gpu-blocks", "256", "--block-size", str(BLOCK)])
    try:
        yield deployment.wait_ready()
    finally:
        deployment.stop()


def _complete(serve: Serve, **body: object) -> httpx.Response:
    return httpx.post(f"{serve.url}/v1/completions", json={"model": "tiny", "temperature": 0, **body}, timeout=120)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime, every thread of the process


def test_idle_pd_instances_use_almost_no_cpu(serve: Serve) -> None:
    # The NIXL UCX progress thread used to poll with a zero timeout: a core per instance, idle.
    assert _complete(serve, prompt="warm the KV path up", max_tokens=2).status_code == 200
    pids = {name: serve.instance_pid(name) for name in serve.instance_urls()}
    start = {name: _cpu_seconds(pid) for name, pid in pids.items()}
    began = time.monotonic()
    wait_for(lambda: time.monotonic() - began >= IDLE_WINDOW_S, f"an idle window of {IDLE_WINDOW_S:.0f}s", 60,
             poll=0.5)
    elapsed = time.monotonic() - began
    usage = {name: (_cpu_seconds(pid) - start[name]) / elapsed for name, pid in pids.items()}
    assert all(u < IDLE_CPU_LIMIT for u in usage.values()), f"idle CPU per instance (of one core): {usage}"


def test_prompt_too_long_names_the_clients_max_tokens(serve: Serve) -> None:
    response = _complete(serve, prompt="hello " * 2100, max_tokens=5)  # tiny: max_model_len 2048
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    found = re.search(r"prompt \((\d+) tokens\) \+ max_tokens \((\d+)\) = (\d+) exceeds max_model_len 2048", message)
    assert found is not None, message
    assert int(found[2]) == 5 and int(found[3]) == int(found[1]) + 5, message  # the client's 5, not the leg's 1


def test_cached_tokens_are_prefix_cache_hits_once_per_prompt(serve: Serve) -> None:
    prompt = list(range(100, 100 + 5 * BLOCK + 3))
    first = _complete(serve, prompt=prompt, max_tokens=2).json()["usage"]
    assert first["prompt_tokens"] == len(prompt)
    assert first["prompt_tokens_details"]["cached_tokens"] == 0  # nothing was served from a prefix cache
    again = _complete(serve, prompt=prompt, max_tokens=2).json()["usage"]
    cached = again["prompt_tokens_details"]["cached_tokens"]
    assert 0 <= cached < len(prompt) and cached % BLOCK == 0, again
    fresh = list(range(300, 300 + 4 * BLOCK + 1))
    several = _complete(serve, prompt=fresh, max_tokens=2, n=3).json()["usage"]
    assert several["prompt_tokens"] == len(fresh)
    assert several["prompt_tokens_details"]["cached_tokens"] <= several["prompt_tokens"], several


def test_unknown_field_is_named_in_a_warning_once(serve: Serve) -> None:
    for _ in range(2):
        assert _complete(serve, prompt="hello", max_tokens=1, foo_bar=1).status_code == 200
    proxy_log = serve.log_dir / "proxy.log"
    wait_for(lambda: "'foo_bar'" in proxy_log.read_text(errors="replace"), "the proxy's warning about foo_bar", 10)
    lines = [line for line in proxy_log.read_text(errors="replace").splitlines() if "'foo_bar'" in line]
    assert len(lines) == 1 and "present in the request but ignored" in lines[0], lines


def test_vllm_series_present_and_no_created_series(serve: Serve) -> None:
    assert _complete(serve, prompt="count me", max_tokens=3, n=2).status_code == 200
    text = httpx.get(f"{serve.url}/metrics", timeout=10).text
    for series in ("vllm:request_prefill_time_seconds_count", "vllm:request_inference_time_seconds_count",
                   "vllm:request_params_n_bucket", "vllm:request_params_max_tokens_bucket",
                   "vllm:request_max_num_generation_tokens_bucket", "vllm:request_time_per_output_token_seconds_bucket",
                   "vllm:cache_config_info"):
        assert series in text, f"{series} missing from /metrics"
    assert re.search(r'vllm:cache_config_info\{[^}]*block_size="8"[^}]*\} 1\.0', text)
    assert re.search(r'vllm:request_params_max_tokens_bucket\{[^}]*le="5\.0"', text)
    assert "_created" not in text
    assert "vllm:time_per_output_token_seconds" not in text  # vLLM's removed name of the inter-token latency


def test_status_table_follows_the_kv_blocks(serve: Serve) -> None:
    decode = next(name for name in serve.instance_urls() if name.startswith("decode"))
    stop = threading.Event()

    def stream() -> None:  # holds decode blocks while it runs; leaving early aborts it
        with httpx.stream("POST", f"{serve.url}/v1/completions", timeout=120, json={
                "model": "tiny", "prompt": list(range(200, 200 + 6 * BLOCK)), "max_tokens": 1500, "ignore_eos": True,
                "stream": True}) as response:
            for _ in response.iter_lines():
                if stop.is_set():
                    return

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    try:
        def busy() -> int:
            return int(httpx.get(f"{serve.instance_urls()[decode]}/info", timeout=5).json()["num_blocks_used"])

        wait_for(busy, f"{decode} to hold KV blocks for the stream", 60, poll=0.2)
        shown = re.compile(rf"\[pdlaunch\] {re.escape(decode)} .* blocks ([1-9]\d*)/256")
        wait_for(lambda: shown.search(serve.output), f"the status line of {decode} to show blocks in use", 30,
                 poll=0.5)
    finally:
        stop.set()
        reader.join(60)


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_second_run_leaves_the_live_deployments_files_alone(serve: Serve) -> None:
    before = _files(serve.log_dir)
    assert "deployment.json" in before
    cwd = serve.log_dir.parent  # the user's directory: `logs` there is the live deployment's
    # A port of its own: smoke's default (8000, or another when that is taken) raced other tests' deployments.
    smoke_port = PortAllocator("127.0.0.1").free("the smoke run")
    smoke = subprocess.run([sys.executable, "-m", "pdlaunch", "smoke", "--colocated", "--model", "tiny", "--device",
                            "cpu", "--num-gpu-blocks", "64", "--block-size", str(BLOCK), "--max-model-len", "256",
                            "--port", str(smoke_port)],
                           cwd=cwd, capture_output=True, text=True, timeout=240)
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    assert "belongs to a running deployment" in smoke.stdout, smoke.stdout
    port = PortAllocator("127.0.0.1").free("a second serve")
    second = subprocess.run([sys.executable, "-m", "pdlaunch", "serve", "--model", "tiny", "--device", "cpu",
                             "--port", str(port)], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert second.returncode == 1
    assert "holds the logs of a running deployment" in second.stderr and f"pid {serve.proc.pid}" in second.stderr, \
        second.stderr
    after = _files(serve.log_dir)
    assert after["deployment.json"] == before["deployment.json"]
    for name, content in before.items():  # the live serve's own logs may only have grown
        assert after[name][:len(content)] == content, f"{name} was rewritten"
    assert set(after) == set(before), "a second run wrote into the live deployment's log dir"


def test_ctrl_c_ends_an_open_stream_with_an_event_then_a_second_stops_at_once(serve: Serve) -> None:
    events: list[str] = []
    first_chunk = threading.Event()

    def read() -> None:
        with httpx.stream("POST", f"{serve.url}/v1/completions", timeout=120, json={
                "model": "tiny", "prompt": "stream a while", "max_tokens": 1900, "ignore_eos": True, "stream": True,
        }) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first_chunk.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert first_chunk.wait(120), "no streamed token within 120s"
    children = list(serve.children)
    serve.proc.send_signal(signal.SIGINT)
    reader.join(60)
    assert not reader.is_alive(), "the stream did not end after Ctrl-C"
    assert events[-1] == "[DONE]", events[-3:]
    last = json.loads(events[-2])
    assert last["error"]["code"] == "shutting_down" and "shutting down" in last["error"]["message"], events[-3:]
    if serve.proc.poll() is None:
        serve.proc.send_signal(signal.SIGINT)
        wait_for(lambda: "second signal: stopping now" in serve.output, "the second Ctrl-C to be heard", 30)
    assert serve.proc.wait(60) == 0, serve.output
    wait_gone(children)
    assert not alive(children)
    proxy_log = (serve.log_dir / "proxy.log").read_text(errors="replace")
    assert "CancelledError" not in proxy_log and "Traceback" not in proxy_log, proxy_log[-3000:]
