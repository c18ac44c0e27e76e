"""A second `pdlaunch serve` on a host where another deployment holds the proxy's port (8000 by default, so a
second deployment given only its own --log-dir meets the first one there): the refusal names --port as the fix,
where it said "give this deployment other ports" to a user who had set none."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdlaunch.config.port_reservations import reservation_holder
from pdlaunch.launcher.ports import PortAllocator
from tests.config.cli_helpers import invoke, write_yaml
from tests.serving.helpers import wait_for

HOST = "127.0.0.1"
# Another launcher: holds its deployment's ports as a running `pdlaunch serve` does (config/port_reservations.py).
HOLD = ("import sys; from pdlaunch.config.port_reservations import PortReservations; r = PortReservations(); "
        "r.reserve(sys.argv[1], int(sys.argv[2])); sys.stdin.read()")


@pytest.fixture()
def held_port() -> Iterator[tuple[int, int]]:
    """(a port another launcher holds, that launcher's pid)."""
    port = PortAllocator(HOST).free("held by the other launcher")
    proc = subprocess.Popen([sys.executable, "-c", HOLD, HOST, str(port)], stdin=subprocess.PIPE)
    try:
        wait_for(lambda: reservation_holder(HOST, port) is not None, "the other process to hold its port", 60)
        yield port, proc.pid
    finally:
        proc.kill()
        proc.wait(30)


def test_the_proxy_port_of_another_deployment_names_the_flag(held_port: tuple[int, int], tmp_path: Path) -> None:
    port, pid = held_port
    served = invoke(["serve", "--model", "tiny", "--device", "cpu", "--port", str(port),
                     "--log-dir", str(tmp_path / "logs")])
    assert served.exit_code == 1, served.output
    text = " ".join(served.output.split())
    assert f"error: --port: port {port} (proxy) on {HOST} belongs to another pdlaunch deployment" in text, text
    assert f"pid {pid}: " in text, text
    assert "(pass another --port (the proxy's port, 8000 by default), or stop that one first)" in text, text
    assert not (tmp_path / "logs").exists()


def test_an_instance_port_keeps_the_general_fix(held_port: tuple[int, int], tmp_path: Path) -> None:
    port, _ = held_port
    proxy_port = PortAllocator(HOST).free("the proxy")
    path = write_yaml(tmp_path, f"instances:\n  - {{role: prefill, count: 1, base_port: {port}}}\n"
                                f"  - {{role: decode, count: 1}}\nproxy: {{port: {proxy_port}}}\n")
    served = invoke(["serve", str(path), "--model", "tiny", "--device", "cpu", "--log-dir", str(tmp_path / "logs")])
    assert served.exit_code == 1, served.output
    text = " ".join(served.output.split())
    assert f"error: instances[0].base_port: port {port} (prefill-0 HTTP)" in text, text
    assert "(give this deployment other ports, or stop that one first)" in text, text
