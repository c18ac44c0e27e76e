"""`--backend ray`: the connect to the cluster (config/ray_cluster.py `connect`, config/ray_gcs.py; the
launcher's stop handling in launcher/backends/ray.py `_connected`). A GCS address whose listener accepts
connections but never answers passes the TCP probe, and ray.init then retried for many minutes, deaf to Ctrl-C
inside Ray's C++ waits: now it is named within ANSWER_TIMEOUT_S. A stop signal while connecting left as a bare
KeyboardInterrupt (SIGINT) or as Ray's own sys.exit(15) (the SIGTERM handler ray.init set): now one line naming
the connect, then os._exit(0), a cut-short ray.init never torn down (launcher/backends/ray_connect_stop.py) nor
gone through by the signal's exception (config/ray_init.py).
In-process, stand-in servers and a stand-in ray.init; no cluster."""

from __future__ import annotations

import functools
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

ray = pytest.importorskip("ray", reason="--backend ray needs the ray package (pip install 'pdlaunch[ray]')")

from pdlaunch.config import ray_cluster, ray_gcs, ray_thread  # noqa: E402
from pdlaunch.config.deployment_config import DeploymentConfig  # noqa: E402 (after the importorskip)
from pdlaunch.errors import PdlaunchError  # noqa: E402
from pdlaunch.launcher.backends import ray as backend  # noqa: E402
from pdlaunch.launcher.log_dir_lock import LOCK_NAME  # noqa: E402
from tests.cluster.ray_connect_stand_in import AFTER_INIT, INSIDE_INIT, Left, stand_in_ray  # noqa: E402
from tests.cluster.test_backend_failures_ray import ray_cfg  # noqa: E402
from tests.cluster.test_ray_cluster_device import AUTO  # noqa: E402


class Server:
    """A listener on 127.0.0.1 that, per connection, reads the client's greeting and answers `reply` (None:
    never reads nor answers; the kernel's backlog accepts the connection)."""

    def __init__(self, reply: bytes | None) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.reply = reply
        if reply is not None:
            threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return  # closed by the test
        with conn:
            try:
                conn.recv(len(ray_gcs.PREFACE))
                assert self.reply is not None
                conn.sendall(self.reply)
                conn.recv(1)  # until the client closes
            except OSError:
                return  # the client closed first (a reset once it read the answer)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def silent() -> Iterator[Server]:
    server = Server(None)
    yield server
    server.close()


def _cfg(tmp_path: Path, address: str) -> DeploymentConfig:
    cfg = ray_cfg(tmp_path)
    cfg.launcher.ray_address = address
    return cfg


def test_a_gcs_that_never_answers_is_named_within_the_bound(silent: Server, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_gcs, "ANSWER_TIMEOUT_S", 1.0)
    inits: list[str] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: inits.append("ray.init"))
    started = time.monotonic()
    with pytest.raises(PdlaunchError) as caught:
        ray_cluster.connect(_cfg(tmp_path, silent.address))  # as serve's and check-config's config loading call it
    assert time.monotonic() - started < 10.0
    assert caught.value.field == "launcher.ray_address", caught.value.render()
    assert (f"something accepts TCP connections at {silent.address} but did not answer as a Ray GCS (gRPC) within "
            "1s") in caught.value.message, caught.value.render()
    assert "give the head's GCS port" in (caught.value.hint or "")
    assert inits == [], "ray.init was called on an address that never answered"
    assert ray_thread.cut_short() is None


def test_a_grpc_server_passes_and_another_service_is_named(tmp_path: Path) -> None:
    grpc_like = Server(bytes([0, 0, 6, 4, 0, 0, 0, 0, 0]) + bytes(6))  # a SETTINGS frame, as a GCS sends first
    other = Server(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    try:
        ray_gcs.check_gcs_answers(grpc_like.address, *ray_cluster.check_address(grpc_like.address))
        with pytest.raises(PdlaunchError) as caught:
            ray_gcs.check_gcs_answers(other.address, *ray_cluster.check_address(other.address))
    finally:
        grpc_like.close()
        other.close()
    assert caught.value.field == "launcher.ray_address"
    assert f"what listens at {other.address} is not a Ray GCS" in caught.value.message, caught.value.render()


@pytest.mark.parametrize(("how", "when"), [("SIGINT", INSIDE_INIT), ("SIGTERM", INSIDE_INIT), ("SIGINT", AFTER_INIT)],
                         ids=["SIGINT inside ray.init", "SIGTERM inside ray.init", "SIGINT after ray.init"])
def test_a_stop_signal_while_connecting_exits_0_at_once(how: str, when: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    calls = stand_in_ray(monkeypatch, how, when)
    with pytest.raises(Left) as left:
        backend.run_ray(_cfg(tmp_path, "auto"))  # the deployment's own connect: RayDeployment -> connect -> ray.init
    assert left.value.code == 0
    output = " ".join(capsys.readouterr().out.split())
    doing = f"connecting to {AUTO}" if when == INSIDE_INIT else "listing the Ray cluster's nodes"
    assert f"{how} received while {doing}; stopping (nothing was placed on the cluster)" in output, output
    # A Ray call cut short (ray.init, ray.nodes) is never torn down (Ray's shutdown of its half-made core worker
    # can SIGSEGV).
    assert calls.shutdowns == []
    assert calls.raised_in_init == [], "the signal's exception went through ray.init"
    assert not (tmp_path / "logs" / LOCK_NAME).exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # run_ray gave the handlers back


def test_another_exit_while_connecting_is_not_taken_for_a_signal(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def connecting(cfg: DeploymentConfig, console: object) -> None:
        raise SystemExit(3)

    monkeypatch.setattr(backend, "RayDeployment", connecting)
    with pytest.raises(SystemExit) as caught:
        backend.run_ray(_cfg(tmp_path, "auto"))
    assert caught.value.code == 3


def test_auto_with_no_cluster_here_names_ray_address_and_ray_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`--ray-address auto` (the default) on a machine that is part of no Ray cluster, RAY_ADDRESS unset: the real
    ray.init finds none. The error said "the Ray cluster at auto", which names nothing a user can act on; it says
    where auto looked now. Ray's own discovery (a `ray start` recorded here, any raylet running here) is made to
    find nothing, whatever other clusters run on this machine."""
    from ray._private import services

    from pdlaunch import cli

    def leave(code: int) -> NoReturn:
        raise Left(code)

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(services, "_cached_find_gcs_addresses", functools.cache(frozenset))  # no raylet runs here
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)
    monkeypatch.setattr(os, "_exit", leave)  # the command leaves Ray with os._exit once it called ray.init
    assert not ray.is_initialized()
    with pytest.raises(Left) as left:
        cli.app(["check-config", "--backend", "ray", "--ray-address", "auto", "--model", "tiny", "--device", "cpu",
                 "--log-dir", str(tmp_path / "logs")], prog_name="pdlaunch", standalone_mode=False)
    said = capsys.readouterr()
    text = " ".join((said.out + said.err).split())
    assert left.value.code == 1, text
    assert "the Ray cluster at auto" not in text, text
    assert ("cannot connect to the Ray cluster this machine is part of (--ray-address auto: RAY_ADDRESS is not set: "
            "the one a `ray start` on this machine runs): Could not find any running Ray instance") in text, text
    assert "ray start --head" in text and "Traceback" not in text, text
    assert not ray.is_initialized()
