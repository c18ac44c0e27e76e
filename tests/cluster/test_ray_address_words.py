"""How `--backend ray`'s stop and failure lines name the cluster (config/ray_init.cluster_words): an address given
(`--ray-address HOST:PORT` or launcher.ray_address in the file) is named as it was given, never in the words for
`auto`; `auto` never claims an address it did not connect to; and the setting is named as the user typed it,
`--ray-address` when the flag set it (as the connect's errors already did), launcher.ray_address otherwise.

Before, a stop while connecting with `--ray-address auto` typed said "(launcher.ray_address auto: ...)", the key
the user never wrote, and a failure while serving ("the Ray cluster's head is gone") was headed
`launcher.ray_address:` though the flag set it. In-process, stand-ins for Ray; no cluster."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

pytest.importorskip("ray", reason="--backend ray needs the ray package (pip install 'pdlaunch[ray]')")

from pdlaunch import cli  # noqa: E402 (after the importorskip)
from pdlaunch.config import ray_cluster  # noqa: E402
from pdlaunch.config.flag_terms import FLAG_NAMES_ENV  # noqa: E402
from pdlaunch.config.ray_init import cluster_words  # noqa: E402
from pdlaunch.launcher.backends import ray as backend  # noqa: E402
from pdlaunch.launcher.backends import ray_connect_stop, ray_head  # noqa: E402
from tests.cluster.ray_connect_stand_in import INSIDE_INIT, Left, stand_in_ray  # noqa: E402
from tests.cluster.test_backend_failures_ray import FakeRay, deployment_on, ray_cfg  # noqa: E402

GIVEN = "10.0.0.5:6379"
UNSET = "RAY_ADDRESS is not set: the one a `ray start` on this machine runs"
COMMANDS = {"serve": 0, "check-config": cli.STOPPED_CHECK_EXIT}  # each command's exit status after a stop


def connected(at: str) -> SimpleNamespace:
    """A ray module connected to the cluster whose GCS is `at`."""
    return SimpleNamespace(is_initialized=lambda: True, get_runtime_context=lambda: SimpleNamespace(gcs_address=at))


def test_an_address_given_is_named_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither RAY_ADDRESS (Ray reads it for auto only) nor the GCS address Ray reports is named instead."""
    monkeypatch.setenv("RAY_ADDRESS", "10.9.9.9:6379")
    for ray in (None, connected("10.0.0.5:6379"), connected("192.168.1.5:6379")):
        assert cluster_words(GIVEN, ray) == f"the Ray cluster at {GIVEN}"  # type: ignore[arg-type]
    assert cluster_words("[fd00::5]:6379") == "the Ray cluster at [fd00::5]:6379"


def test_auto_names_no_address_it_did_not_connect_to(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def gone() -> SimpleNamespace:
        raise ConnectionError("the GCS went away")

    not_yet = SimpleNamespace(is_initialized=lambda: False, get_runtime_context=lambda: 1 / 0)
    went_away = SimpleNamespace(is_initialized=lambda: True, get_runtime_context=gone)
    for ray in (None, not_yet, went_away):
        assert cluster_words("auto", ray) == f"the Ray cluster this machine is part of (launcher.ray_address " \
                                             f"auto: {UNSET})"  # type: ignore[arg-type]
    assert cluster_words("auto", connected("10.0.0.1:6379")) == \
        f"the Ray cluster this machine is part of (launcher.ray_address auto: {UNSET}), at 10.0.0.1:6379"  # type: ignore[arg-type]


def _stopped_inside_init(command: str, args: list[str], monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture[str]) -> str:
    """`pdlaunch COMMAND ARGS` (ray backend, tiny, cpu), SIGINT inside its first ray.init; its one line."""
    calls = stand_in_ray(monkeypatch, "SIGINT", INSIDE_INIT)
    with pytest.raises(Left) as left:
        cli.app([command, "--backend", "ray", "--model", "tiny", "--device", "cpu", *args], prog_name="pdlaunch",
                standalone_mode=False)
    assert left.value.code == COMMANDS[command]
    assert calls.raised_in_init == [] and calls.shutdowns == []
    return " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("address", [GIVEN, "[fd00::5]:6379", "[::1]:6379"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_stop_while_connecting_to_an_address_given_names_it(command: str, address: str,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`[fd00::5]` read as a rich markup tag was dropped from the line ("the Ray cluster at :6379")."""
    monkeypatch.setenv("RAY_ADDRESS", "10.9.9.9:6379")  # not what Ray connects to when an address is given
    monkeypatch.setattr(ray_cluster, "gcs_probe", lambda address: None)  # a GCS answers there
    monkeypatch.setattr(ray_cluster, "check_gcs_answers", lambda address, host, port: None)
    err = _stopped_inside_init(command, ["--ray-address", address], monkeypatch, capsys)
    assert err == f"SIGINT received while connecting to the Ray cluster at {address}; stopping (nothing was placed " \
                  "on the cluster)", err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_stop_while_connecting_to_auto_names_the_flag_typed(command: str, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    err = _stopped_inside_init(command, ["--ray-address", "auto"], monkeypatch, capsys)
    assert err == f"SIGINT received while connecting to the Ray cluster this machine is part of (--ray-address auto: " \
                  f"{UNSET}); stopping (nothing was placed on the cluster)", err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_stop_while_connecting_to_auto_from_the_file_names_the_key(command: str, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """auto from the file (or the default: no flag, no key) is the key launcher.ray_address."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = tmp_path / "pd.yaml"
    config.write_text("launcher: {backend: ray, ray_address: auto}\n")
    err = _stopped_inside_init(command, [str(config)], monkeypatch, capsys)
    assert "(launcher.ray_address auto: RAY_ADDRESS is not set" in err and "--ray-address" not in err, err


def test_a_stop_in_the_serve_backends_connect_names_the_flag_typed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A stop while `pdlaunch serve`'s backend makes its deployment (no Ray call cut short) names the cluster as
    the loader's stop does; `pdlaunch serve` hands the backend the flags typed (FLAG_NAMES_ENV)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv(FLAG_NAMES_ENV, json.dumps({"launcher.ray_address": "--ray-address"}))

    def stopped(cfg: object, console: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal did not raise StopRequested")  # StopSignals' handler raises it above

    left: list[int] = []

    def leave(code: int) -> None:
        left.append(code)
        raise Left(code)

    monkeypatch.setattr(backend, "RayDeployment", stopped)
    monkeypatch.setattr(ray_connect_stop.os, "_exit", leave)
    with pytest.raises(Left):
        backend.run_ray(ray_cfg(tmp_path))
    assert left == [0]
    out = " ".join(capsys.readouterr().out.split())
    assert out == f"SIGTERM received while connecting to the Ray cluster this machine is part of (--ray-address " \
                  f"auto: {UNSET}); stopping (nothing was placed on the cluster)", out


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("flags", "named"), [({"launcher.ray_address": "--ray-address"}, "--ray-address"),
                                              ({}, "launcher.ray_address")])
def test_a_lost_head_is_headed_by_the_setting_as_typed(flags: dict[str, str], named: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The failure that stops a serving deployment names the setting as the user typed it, as a failure before
    serving (the connect's) does."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv(FLAG_NAMES_ENV, json.dumps(flags))
    monkeypatch.setattr(ray_head, "LOST_S", 0.0)
    deployment = deployment_on(FakeRay(gcs_address=closed), tmp_path, monkeypatch)
    monkeypatch.setattr(backend, "RayDeployment", lambda cfg, console: deployment)
    monkeypatch.setattr(type(deployment), "start", lambda self, should_stop: True)
    monkeypatch.setattr(backend, "POLL_S", 0.01)
    assert backend.run_ray(ray_cfg(tmp_path)) == 1
    text = " ".join(capsys.readouterr().out.split())
    assert f"error: {named}: the Ray cluster's head is gone: its GCS at {closed}" in text, text


def test_the_placement_line_names_the_flag_typed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ray: N placement group(s) asked of CLUSTER`, for auto typed as `--ray-address auto`."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv(FLAG_NAMES_ENV, json.dumps({"launcher.ray_address": "--ray-address"}))
    deployment = deployment_on(FakeRay(gcs_address="10.0.0.1:6379"), tmp_path, monkeypatch)
    deployment.console = Console(file=io.StringIO(), width=400)
    monkeypatch.setattr(deployment.actors, "place", lambda run: None)
    try:
        assert deployment.start(should_stop=lambda: True) is False
    finally:
        deployment.stop(drain=False)
    out = " ".join(deployment.console.file.getvalue().split())  # type: ignore[attr-defined]
    assert "asked of the Ray cluster this machine is part of (--ray-address auto:" in out, out

