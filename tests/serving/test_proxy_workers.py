"""proxy.workers (pdlaunch/proxy/workers.py): N proxy processes on one port behind a supervisor, in front of
scripted instances. Both workers answer, every answer is right, /metrics sums the workers' counters whichever
worker answers the scrape, SIGTERM stops and reaps them all, a worker that dies takes the proxy down with exit
1 (so the launcher restarts it whole), and bad values are refused naming the flag or field. Under the launcher, the
workers' metrics files and load board live in a directory the launcher makes for each start of the proxy and removes
once it has reaped it: a hurried stop or a proxy killed from outside (SIGKILL: no exit of its own) leaves nothing in
TMPDIR, and a restarted proxy sums none of the dead one's counters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from pdlaunch.config.deployment_config import DeploymentConfig, proxy_policy_args
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.__main__ import parse_args
from pdlaunch.proxy.workers import worker_argv
from tests.config.cli_helpers import check
from tests.serving.e2e import Serve, alive, children_of, wait_gone
from tests.serving.helpers import ThreadServer, wait_for
from tests.serving.test_proxy_failures import ScriptedInstance

STREAM_TOKENS = 1900  # a stream still running when the stop comes (tiny model on CPU: tens of seconds)


def _two_workers(supervisor: int) -> list[int]:
    """The supervisor's two workers (they carry `--parent-pid <supervisor>`), once both are running."""
    return wait_for(lambda: len(children_of(supervisor)) == 2 and children_of(supervisor),  # type: ignore[no-any-return]
                    "the supervisor's two workers", 60)


def _wait_both_answer(url: str, workers: list[int]) -> None:
    """Until each worker has answered a /health (a new connection each time: the kernel picks the worker)."""
    seen: set[int] = set()
    wait_for(lambda: seen.add(_health_pid(url) or 0) or set(workers) <= seen,  # type: ignore[func-returns-value]
             f"both workers {workers} to answer /health (seen {seen})", 120)


def _health_pid(url: str) -> int | None:
    try:
        r = httpx.get(url + "/health", timeout=5)  # a new connection each time: the kernel picks the worker
    except httpx.HTTPError:
        return None
    return int(r.json()["pid"]) if r.status_code == 200 else None


def _completions_total(text: str) -> float:
    for line in text.splitlines():
        if line.startswith('pdlaunch_proxy_requests_total{') and 'route="/v1/completions"' in line \
                and 'status="200"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class _Proxy:
    def __init__(self, log: Path, *extra: str) -> None:
        ports = PortAllocator("127.0.0.1")
        self.prefill, self.decode = ScriptedInstance("prefill"), ScriptedInstance("decode")
        self.p = ThreadServer(self.prefill.app, ports.free("prefill"))
        self.d = ThreadServer(self.decode.app, ports.free("decode"))
        self.port = ports.free("proxy")
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path, self.extra = log, extra

    def __enter__(self) -> _Proxy:
        self.p.__enter__()
        self.d.__enter__()
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "pdlaunch.proxy", "--port", str(self.port), "--prefill",
                                      self.p.url, "--decode", self.d.url, "--workers", "2", *self.extra],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        self.d.__exit__()
        self.p.__exit__()

    def read_log(self) -> str:
        return self.log_path.read_text()


@pytest.mark.slow
def test_two_workers_serve_sum_their_counters_and_stop_together(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    own_tmp = tmp_path / "tmp"  # run alone (no --tmp-dir), the proxy makes its metrics dir in TMPDIR, and removes it
    own_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(own_tmp))
    with _Proxy(tmp_path / "proxy.log") as proxy:
        workers = _two_workers(proxy.proc.pid)
        assert [p.name.startswith("pdlaunch-proxy-metrics-") for p in own_tmp.iterdir()] == [True]
        _wait_both_answer(proxy.url, workers)

        def ask(i: int) -> str:
            with httpx.Client(timeout=30) as client:  # its own connection: either worker may take it
                r = client.post(proxy.url + "/v1/completions", json={"prompt": f"p{i}", "stream": True})
                assert r.status_code == 200, r.text
                return r.text

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(40)))
        assert all('"t0"' in a and '"t2"' in a and "[DONE]" in a for a in answers), answers[:2]
        assert len(proxy.decode.requests) == 40
        # Whichever worker answers the scrape, the requests counter is both workers' sum.
        for _ in range(6):
            text = httpx.get(proxy.url + "/metrics", timeout=10).text
            assert _completions_total(text) == 40, [line for line in text.splitlines() if "requests_total" in line]
            assert "pdlaunch_proxy_instance_up" in text  # the answering worker's own gauges are there too

        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(60) == 0, proxy.read_log()[-2000:]
    assert not alive(workers), "a worker outlived the supervisor"
    assert not _left_in(own_tmp), f"left behind in TMPDIR: {_left_in(own_tmp)}"
    log = proxy.read_log()
    assert "2 workers (pids" in log and "stopping 2 workers (SIGTERM)" in log, log[-2000:]
    assert "proxy[0]" in log and "proxy[1]" in log, log[-2000:]


@pytest.mark.slow
def test_sigterm_ends_open_streams_on_every_worker_with_an_event(tmp_path: Path) -> None:
    """Each worker drains its own streams: eight open streams, whichever worker relays each, end with the
    shutting_down event, and the supervisor exits 0 once every worker has."""
    import json
    import threading

    with _Proxy(tmp_path / "proxy.log", "--drain-timeout", "2") as proxy:
        workers = _two_workers(proxy.proc.pid)
        _wait_both_answer(proxy.url, workers)
        streams: list[list[str]] = [[] for _ in range(8)]
        started = threading.Barrier(len(streams) + 1, timeout=60)

        def read(events: list[str]) -> None:
            with httpx.stream("POST", proxy.url + "/v1/completions", timeout=60,
                              json={"prompt": "slow", "stream": True}) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if len(events) == 3:
                            started.wait()

        readers = [threading.Thread(target=read, args=(events,), daemon=True) for events in streams]
        for reader in readers:
            reader.start()
        started.wait()  # every stream has its three tokens and waits for more
        proxy.proc.send_signal(signal.SIGTERM)
        for reader in readers:
            reader.join(60)
        assert not any(reader.is_alive() for reader in readers), "a stream did not end after SIGTERM"
        assert proxy.proc.wait(60) == 0, proxy.read_log()[-2000:]
    for events in streams:
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "shutting_down", events[-2:]
    assert not alive(workers)


@pytest.mark.slow
def test_a_worker_that_dies_takes_the_proxy_down_with_exit_1(tmp_path: Path) -> None:
    with _Proxy(tmp_path / "proxy.log") as proxy:
        workers = _two_workers(proxy.proc.pid)
        wait_for(lambda: _health_pid(proxy.url) is not None, "a worker to answer /health", 120)
        os.kill(workers[0], signal.SIGKILL)
        assert proxy.proc.wait(60) == 1
    assert not alive(workers)
    log = proxy.read_log()
    assert f"(pid {workers[0]}) was killed by signal 9 (SIGKILL) while serving" in log, log[-2000:]


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The proxy's usage error for `argv` (parsed in this process: the entry point's exit status and one-line
    error are test_a_usage_error_of_an_entry_point_exits_1_naming_the_flag's)."""
    with pytest.raises(SystemExit) as exited:
        parse_args(["--colocated", "http://127.0.0.1:1", *argv])
    assert exited.value.code == 1
    return capsys.readouterr().err


def test_bad_worker_counts_are_refused_naming_the_flag_or_field(capsys: pytest.CaptureFixture[str]) -> None:
    for value in ("0", "65"):
        assert "--workers must be 1 to 64" in _refused(["--workers", value], capsys)
    read, write = os.pipe()  # an open descriptor that is not a socket
    try:
        assert f"--listen-fd {read}: not an open socket" in _refused(["--listen-fd", str(read)], capsys)
    finally:
        os.close(read)
        os.close(write)
    assert "--tmp-dir /nonexistent/pdlaunch: no such directory" in _refused(["--tmp-dir", "/nonexistent/pdlaunch"],
                                                                           capsys)
    with pytest.raises(ValueError, match="workers"):
        DeploymentConfig.model_validate({"model": {"path": "tiny"}, "proxy": {"workers": 0}})
    result = check(["--model", "tiny", "--proxy-workers", "0"])  # asserts no traceback
    assert result.exit_code == 1 and "--proxy-workers: must be auto or a whole number from 1 to 64, got 0" \
        in result.output, result.output


def test_the_workers_setting_reaches_the_proxy_and_each_worker_gets_the_socket() -> None:
    cfg = DeploymentConfig.model_validate({"model": {"path": "tiny"}, "proxy": {"workers": 3}})
    args = proxy_policy_args(cfg, lambda: "tiny")
    assert args[args.index("--workers") + 1] == "3"
    assert "--workers" not in proxy_policy_args(
        DeploymentConfig.model_validate({"model": {"path": "tiny"}, "proxy": {"workers": 1}}), lambda: "tiny")
    default = proxy_policy_args(DeploymentConfig.model_validate({"model": {"path": "tiny"}}), lambda: "tiny")
    assert default[default.index("--workers") + 1] == "auto"  # resolved by the proxy process where it runs
    argv = ["--port", "8000", "--workers", "3", "--parent-pid", "77", "--workers=3", "--tmp-dir", "/t", "--decode", "x"]
    assert worker_argv(argv, 9, 1, Path("/tmp/b")) == [
        "--port", "8000", "--decode", "x", "--listen-fd", "9", "--worker-index", "1", "--load-board", "/tmp/b",
        "--parent-pid", str(os.getpid())]


@pytest.mark.e2e
def test_pdlaunch_serve_with_two_proxy_workers(tmp_path: Path) -> None:
    """The user's path: `pdlaunch serve tiny --prefill 1 --decode 1 --proxy-workers 2`; greedy answers through
    both workers equal each other, /metrics counts them all, Ctrl-C leaves no worker behind."""
    serve = Serve(tmp_path, ["--model", "tiny", "--prefill", "1", "--decode", "1", "--proxy-workers", "2",
                             "--num-gpu-blocks", "256", "--block-size", "8"])
    try:
        serve.wait_ready()
        workers = next(found for found in map(children_of, serve.children) if len(found) == 2)  # the proxy's
        _wait_both_answer(serve.url, workers)

        def ask(_: int) -> str:
            with httpx.Client(timeout=120) as client:
                r = client.post(serve.url + "/v1/completions",
                                json={"prompt": "the same prompt", "max_tokens": 8, "temperature": 0})
                assert r.status_code == 200, r.text
                return str(r.json()["choices"][0]["text"])

        with ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(ask, range(12)))
        assert len(set(texts)) == 1, texts
        assert _completions_total(httpx.get(serve.url + "/metrics", timeout=30).text) == 12
    finally:
        serve.stop()
    wait_gone(workers)
    assert "proxy[1]" in (serve.log_dir / "proxy.log").read_text()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("module", ["pdlaunch.proxy", "pdlaunch.server", "pdlaunch.launcher.backends.slurm_node",
                                    "pdlaunch.distributed.remote_rank"])
def test_a_usage_error_of_an_entry_point_exits_1_naming_the_flag(module: str) -> None:
    """As the CLI's: exit 1, one line naming the flag and where the usage is (argparse's own: exit 2, usage first)."""
    r = subprocess.run([sys.executable, "-m", module, "--no-such-flag"], capture_output=True, text=True, timeout=100,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 1, (r.returncode, r.stderr)
    [line] = r.stderr.strip().splitlines()  # a missing required flag, or the unknown one, named on one line
    assert line.startswith(f"python -m {module}: error: ") and "--" in line, line
    assert line.endswith(f"(see python -m {module} --help)"), line


def _metrics_dirs(tmp: Path) -> list[Path]:
    return sorted(tmp.rglob("pdlaunch-proxy-metrics-*"))


def _left_in(tmp: Path) -> dict[str, list[str]]:
    """What is in `tmp` (the launcher's and its children's TMPDIR), each directory with its files."""
    return {str(p.relative_to(tmp)): sorted(f.name for f in p.iterdir()) if p.is_dir() else [] for p in tmp.rglob("*")}


@pytest.mark.e2e
@pytest.mark.slow
def test_a_hurried_stop_leaves_no_proxy_metrics_dir_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own_tmp = tmp_path / "tmp"
    own_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(own_tmp))  # the launcher's and its children's
    serve = Serve(tmp_path, ["--model", "tiny", "--colocated", "--proxy-workers", "2"])
    try:
        serve.wait_ready()
        assert _metrics_dirs(own_tmp), "the proxy made no metrics dir"
        streamed = threading.Event()

        def stream() -> None:
            body = {"model": "tiny", "prompt": "hello " * 20, "max_tokens": STREAM_TOKENS, "stream": True}
            try:
                with httpx.stream("POST", f"{serve.url}/v1/completions", json=body, timeout=120) as response:
                    for _ in response.iter_lines():
                        streamed.set()
            except httpx.HTTPError:
                pass  # the hurried stop cuts it

        threading.Thread(target=stream, daemon=True).start()
        wait_for(streamed.is_set, "the stream to begin", 60)
        serve.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "draining in-flight requests" in serve.output, "serve to begin its drain", 30)
        serve.proc.send_signal(signal.SIGTERM)  # second signal: stop at once
        assert serve.proc.wait(60) == 0, serve.output
        assert "stopped: all processes reaped" in serve.output, serve.output
        assert not _left_in(own_tmp), f"left behind in TMPDIR: {_left_in(own_tmp)}"
    finally:
        serve.stop()


@pytest.mark.e2e
@pytest.mark.slow
def test_a_proxy_killed_from_outside_is_restarted_with_a_new_empty_metrics_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The OOM killer's SIGKILL to the proxy's supervisor: the launcher kills its workers, removes their directory and
    restarts the proxy with a new one; the dead proxy's counters are not summed into the new one's /metrics."""
    own_tmp = tmp_path / "tmp"
    own_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(own_tmp))
    serve = Serve(tmp_path, ["--model", "tiny", "--colocated", "--proxy-workers", "2"])
    try:
        serve.wait_ready()
        [first] = _metrics_dirs(own_tmp)
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0}
        assert httpx.post(f"{serve.url}/v1/completions", json=body, timeout=120).status_code == 200
        assert _completions_total(httpx.get(serve.url + "/metrics", timeout=30).text) == 1
        [proxy] = [pid for pid in serve.children
                   if b"pdlaunch.proxy" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        os.kill(proxy, signal.SIGKILL)
        wait_for(lambda: "proxy is ready again after restart 1" in serve.output, "the proxy's restart", 120)
        assert not first.exists(), f"the dead proxy's dir is left: {_left_in(own_tmp)}"
        [second] = _metrics_dirs(own_tmp)
        assert second != first
        assert httpx.post(f"{serve.url}/v1/completions", json=body, timeout=120).status_code == 200
        assert _completions_total(httpx.get(serve.url + "/metrics", timeout=30).text) == 1  # its own request only
    finally:
        serve.stop()
    assert serve.proc.returncode == 0, serve.output
    assert not _left_in(own_tmp), f"left behind in TMPDIR: {_left_in(own_tmp)}"

