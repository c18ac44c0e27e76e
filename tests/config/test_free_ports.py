"""The tests' port picks: the ports of one pick are distinct (two single picks in a row may repeat one)."""

from __future__ import annotations

import socket

from tests.helpers.ports import free_ports


def test_the_ports_of_one_pick_are_distinct_and_bindable() -> None:
    ports = free_ports(64)
    assert len(set(ports)) == 64
    for port in ports[:4]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
