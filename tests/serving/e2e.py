"""`pdlaunch serve` as a real subprocess for the e2e tests: start, wait, find its children, stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from pdlaunch.launcher.ports import PortAllocator
from tests.serving.helpers import wait_for

START_TIMEOUT_S = 240.0  # three processes importing torch and building engines on a shared 2-core box
READY_LINE = "ready: OpenAI API at "  # launcher/serve.py announces it when supervision begins


def children_of(launcher_pid: int) -> list[int]:
    """Pids of live processes the launcher started (they carry `--parent-pid <launcher pid>`)."""
    marker = f"--parent-pid\0{launcher_pid}\0".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline + b"\0" and state != "Z":
            pids.append(int(entry.name))
    return pids


class Serve:
    """One `pdlaunch serve` process with its stdout+stderr in a file."""

    def __init__(self, tmp: Path, args: list[str], device: str = "cpu") -> None:
        self.port = PortAllocator("127.0.0.1").free("e2e proxy")
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_dir = tmp / "logs"
        self.output_path = tmp / "serve.out"
        argv = [sys.executable, "-m", "pdlaunch", "serve", "--device", device, "--port", str(self.port),
                "--log-dir", str(self.log_dir), *args]
        self._out = open(self.output_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.children: list[int] = []

    @property
    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def wait_ready(self) -> Serve:
        """Ready and supervised: the proxy answers /health and the launcher announced it. The proxy answers a
        moment before the launcher's own readiness check sees it; a death in that window is a failed start
        ("stopping the deployment"), not an outage to restart from."""
        def ready() -> bool:
            assert self.proc.poll() is None, f"pdlaunch serve exited with {self.proc.returncode}:\n{self.output}"
            try:
                answered = httpx.get(f"{self.url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
            return answered and READY_LINE in self.output

        wait_for(ready, "pdlaunch serve to become ready", START_TIMEOUT_S, poll=0.2)
        self.children = children_of(self.proc.pid)
        return self

    def instance_urls(self) -> dict[str, str]:
        return {i["name"]: i["url"] for i in httpx.get(f"{self.url}/instances", timeout=5).json()}

    def instance_pid(self, name: str) -> int:
        return int(httpx.get(f"{self.instance_urls()[name]}/info", timeout=5).json()["pid"])

    def stop(self) -> None:
        """Ctrl-C, and if anything is left after 30 s, SIGKILL what this test started."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._out.close()


def alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(pid)
    return out


def wait_gone(pids: list[int], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pids), f"processes still running after {timeout:.0f}s: {alive(pids)}"


def pd_and_colocated(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[dict[str, Serve]]:
    """A 1P1D and a colocated `pdlaunch serve` of the tiny model, both ready; stopped when the caller ends.
    The 1P1D runs with --async-scheduling (the default with CUDA, off by default on CPU), the colocated one
    without: a test that compares them compares the two schedulers too."""
    common = ["--model", "tiny", "--num-gpu-blocks", "256", "--block-size", "8"]
    with serving({"pd": (tmp_path_factory.mktemp(f"pd-{name}"),
                         [*common, "--prefill", "1", "--decode", "1", "--async-scheduling"]),
                  "colocated": (tmp_path_factory.mktemp(f"colocated-{name}"), [*common, "--colocated"])}) as started:
        yield started


@contextmanager
def serving(runs: dict[str, tuple[Path, list[str]]]) -> Iterator[dict[str, Serve]]:
    """Each run a `pdlaunch serve` (its directory, its arguments), all started before any is awaited (they load
    side by side), then all ready; every one started is stopped at the end, also when another failed."""
    started: dict[str, Serve] = {}
    try:
        for name, (tmp, args) in runs.items():
            started[name] = Serve(tmp, args)
        for serve in started.values():
            serve.wait_ready()
        yield started
    finally:
        for serve in started.values():
            serve.stop()


@contextmanager
def second_proxy(serve: Serve, log_path: Path, secret: str, *flags: str, log_level: str = "debug") -> Iterator[str]:
    """Another proxy process over `serve`'s instances, with `flags`, signing its legs with the deployment's
    `secret` as the launcher's proxy does; its output, at `log_level`, in `log_path`. Yields its URL once /health
    answers; stopped and reaped on exit."""
    port = PortAllocator("127.0.0.1").free("second proxy")
    argv = [sys.executable, "-m", "pdlaunch.proxy", "--port", str(port), "--log-level", log_level, *flags]
    for name, url in serve.instance_urls().items():
        argv += [f"--{name.rsplit('-', 1)[0]}", f"{name}={url}"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PDLAUNCH_DEPLOYMENT_SECRET": secret})
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            assert proc.poll() is None, log_path.read_text()
            try:
                return httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, "the second proxy to be ready", 60, poll=0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
