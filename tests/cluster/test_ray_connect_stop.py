"""`pdlaunch serve` and `pdlaunch check-config` with `--backend ray`, stopped while the config loader connects to
the cluster (config/ray_cluster.connect: the first ray.init of either). Inside ray.init the process leaves at once
(launcher/backends/ray_connect_stop.py) with its command's status, serve 0 and check-config 130 (check-config used
to leave with 0 there, as if it had a verdict), never through ray.shutdown, which can SIGSEGV on a cut-short init,
and without the signal's exception ever going through ray.init (config/ray_init.py: raised inside a real one it can
hang the process for good). Once the connect is done, a stop while the cluster's nodes are listed (ray.nodes, in a
helper thread as well) leaves the same way, naming that call (a SIGTERM used to meet Ray's own handler by then, which
ended the command with exit 15). In-process, a stand-in ray.init; no cluster."""

from __future__ import annotations

import signal

import pytest

pytest.importorskip("ray", reason="--backend ray needs the ray package (pip install 'pdlaunch[ray]')")

from pdlaunch import cli  # noqa: E402 (after the importorskip)
from tests.cluster.ray_connect_stand_in import AFTER_INIT, INSIDE_INIT, Left, stand_in_ray  # noqa: E402
from tests.cluster.test_ray_cluster_device import AUTO  # noqa: E402

COMMANDS = {"serve": 0, "check-config": cli.STOPPED_CHECK_EXIT}  # each command's exit status after a stop


def _args(command: str) -> list[str]:
    return [command, "--backend", "ray", "--ray-address", "auto", "--model", "tiny", "--device", "cpu"]


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_stop_inside_ray_init_leaves_at_once_with_the_commands_status(command: str, how: str,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # auto is then the cluster a `ray start` here runs
    calls = stand_in_ray(monkeypatch, how, INSIDE_INIT)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(Left) as left:
        cli.app(_args(command), prog_name="pdlaunch", standalone_mode=False)
    assert left.value.code == COMMANDS[command]
    err = " ".join(capsys.readouterr().err.split())
    # auto named as the user typed it, --ray-address (the connect's errors too), not the key launcher.ray_address
    typed = AUTO.replace("launcher.ray_address auto", "--ray-address auto")
    assert err == f"{how} received while connecting to {typed}; stopping (nothing was placed on the cluster)", err
    assert calls.raised_in_init == [], "the signal's exception went through ray.init"
    assert calls.shutdowns == [], "a cut-short ray.init was torn down"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # given back


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_stop_while_the_nodes_are_listed_leaves_at_once(command: str, how: str, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """ray.nodes, after the connect, runs in a helper thread too: the stop is seen in the main thread, never raised
    inside Ray's code (inside the GPU probe's ray.get it became a SystemError, reported as a GPU it could not
    read), and the call still running is not torn down."""
    calls = stand_in_ray(monkeypatch, how, AFTER_INIT)
    with pytest.raises(Left) as left:
        cli.app(_args(command), prog_name="pdlaunch", standalone_mode=False)
    assert left.value.code == COMMANDS[command]
    err = " ".join(capsys.readouterr().err.split())
    assert err == f"{how} received while listing the Ray cluster's nodes; stopping (nothing was placed on the " \
                  "cluster)", err
    assert calls.shutdowns == []  # ray.nodes still runs in its thread
