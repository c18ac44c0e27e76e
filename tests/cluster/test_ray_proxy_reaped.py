"""`--backend ray`: a proxy that died is reaped as the local supervisor reaps a child (Supervisor._ended): what is left
of its process group (its workers) is SIGKILLed and its --tmp-dir (metrics files, load board) removed as soon as its
exit is seen, not when the restart comes after the backoff (or at the stop). The proxy is a real process on this
machine (a stand-in leader that leaves a worker and a file behind); only Ray is faked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="--backend ray needs the ray package (pip install 'pdlaunch[ray]')")

from pdlaunch.launcher.process import ChildProcess  # noqa: E402 (after the importorskip)
from tests.cluster.test_backend_failures_ray import FakeRay, running_on  # noqa: E402
from tests.launcher.test_group_at_reaping import LEADER, _gone, _wait_gone, _worker_pid  # noqa: E402
from tests.serving.helpers import wait_for  # noqa: E402


def test_a_dead_proxys_group_is_killed_and_its_directory_removed_when_its_exit_is_seen(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with running_on(FakeRay(), tmp_path, monkeypatch) as deployment:
        said: list[str] = []
        monkeypatch.setattr(deployment, "say", said.append)
        proxy = deployment.proxy
        proxy.process = ChildProcess("proxy", [sys.executable, "-c", LEADER, "exit"], tmp_path / "proxy.log",
                                     tmp_dir_flag="--tmp-dir")
        proxy.process.start()
        proxy.record.ready = True
        worker = _worker_pid(proxy.process)
        made = proxy.process.tmp_dir
        assert made is not None and (made / "board").is_file()
        wait_for(lambda: proxy.process is not None and proxy.process.poll() is not None, "the proxy to exit", 30)
        assert not _gone(worker) and made.is_dir()  # the leader's exit alone leaves both

        proxy.check(deployment.runs, now=100.0, policy=deployment.policy)  # sees the exit: restart after the backoff
        assert proxy.record.due is not None and proxy.record.due > 100.0, said
        _wait_gone(worker)
        assert not made.exists(), f"left behind: {sorted(p.name for p in made.iterdir())}"
        assert any(line.startswith("the proxy exited with code 1; restarting it in") for line in said), said
