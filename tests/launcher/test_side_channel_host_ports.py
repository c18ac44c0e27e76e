"""The KV side channel binds kv_transfer.side_channel_host (kv_transfer/prefill/side.py), and its ports were
bind-tested and held on the node's address (127.0.0.1 on one node) instead: a port in use on the side channel's
own address passed the plan, and the prefill failed later on "address already in use"; another launcher holding
the port there did not stop this one. Now they are tested and held on the address the instance binds, and
check-config warns of a port in use there.

127.0.0.2 plays the side channel's address (any 127/8 address is this machine's loopback on Linux).
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import Result

from pdlaunch.config.loader import load_deployment
from pdlaunch.config.port_reservations import PortReservations, reservation_holder
from pdlaunch.errors import PdlaunchError
from pdlaunch.launcher.plan import plan_deployment
from tests.config.cli_helpers import check, invoke
from tests.helpers.ports import free_ports

SIDE = "127.0.0.2"


@contextmanager
def listening(host: str, port: int) -> Iterator[None]:
    with socket.socket() as sock:
        sock.bind((host, port))
        sock.listen()
        yield


def config(tmp_path: Path, side_port: int | None, proxy_port: int, side_host: str = SIDE) -> Path:
    path = tmp_path / "pd.yaml"
    side = "" if side_port is None else f", side_channel_port: {side_port}"
    path.write_text("device: cpu\nmodel: {path: tiny}\n"
                    f"kv_transfer: {{side_channel_host: {side_host}{side}}}\n"
                    "instances:\n  - {role: prefill, count: 1}\n  - {role: decode, count: 1}\n"
                    f"proxy: {{port: {proxy_port}}}\n")
    return path


def one_line(result: Result) -> str:
    return " ".join(result.output.split())


def test_serve_refuses_a_side_channel_port_in_use_on_the_side_channel_host(tmp_path: Path) -> None:
    side, proxy = free_ports(2, SIDE)
    with listening(SIDE, side):
        served = invoke(["serve", str(config(tmp_path, side, proxy)), "--log-dir", str(tmp_path / "logs")])
    assert served.exit_code == 1, served.output
    assert f"error: kv_transfer.side_channel_port: port {side} (prefill-0 side channel rank 0) on {SIDE} is " \
        "already in use" in one_line(served), served.output
    assert not (tmp_path / "logs").exists()


def test_check_config_warns_of_a_side_channel_port_in_use_on_the_side_channel_host(tmp_path: Path) -> None:
    side, proxy = free_ports(2, SIDE)
    with listening(SIDE, side):
        result = check([str(config(tmp_path, side, proxy))])
    assert result.exit_code == 0, result.output
    assert f"warning: kv_transfer.side_channel_port: ports {side}-{side + 1} (side channel) on {SIDE}: {side} in " \
        "use now" in one_line(result), result.output


@pytest.mark.parametrize("side_host", [SIDE, "0.0.0.0"])
def test_the_side_channel_ports_are_held_on_the_side_channel_host(tmp_path: Path, side_host: str) -> None:
    side, proxy = free_ports(2, SIDE)
    cfg = load_deployment(config(tmp_path, side, proxy, side_host), {})
    theirs, mine = PortReservations(), PortReservations()
    try:
        plan = plan_deployment(cfg, theirs)
        assert [p.spec.side_channel_port for p in plan.instances] == [side, side + 1]
        assert {(side_host, side), (side_host, side + 1)} <= set(theirs.held)
        assert ("127.0.0.1", side) not in theirs.held
        with pytest.raises(PdlaunchError) as refused:  # a second launcher of the same config, on this host
            plan_deployment(cfg, mine)
        assert refused.value.field in ("kv_transfer.side_channel_port", "proxy.port")
    finally:
        theirs.release()
        mine.release()
    assert reservation_holder(side_host, side) is None


def test_a_free_side_channel_range_does_not_take_a_port_of_another_process_of_the_deployment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the side channel on 0.0.0.0 and the instances' HTTP on 127.0.0.1, two allocators pick free ports: a
    port number handed to both is one port (the wildcard takes it on every address), and the deployment's two
    processes would collide in their binds. The side channel's first pick is forced onto prefill-0's HTTP port."""
    cfg = load_deployment(config(tmp_path, None, free_ports(1)[0], "0.0.0.0"), {})
    tried: list[int] = []
    draw = random.Random.randrange

    def randrange(rng: random.Random, low: int, high: int) -> int:
        tried.append(tried[0] if len(tried) == 1 else draw(rng, low, high))  # prefill's HTTP, then its side channel
        return tried[-1]

    monkeypatch.setattr(random.Random, "randrange", randrange)
    held = PortReservations()
    try:
        plan = plan_deployment(cfg, held)
    finally:
        held.release()
    prefill = plan.instances[0].spec
    assert tried[0] == tried[1] == prefill.port and prefill.side_channel_port != prefill.port, tried
    ports = [p for i in plan.instances for p in (i.spec.port, i.spec.side_channel_port)]
    assert len(set(ports)) == len(ports), ports
