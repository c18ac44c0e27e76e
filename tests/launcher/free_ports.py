"""Ports for the launcher's two-node plans on this machine: node 0 at 127.0.0.1, node 1 at 127.0.0.2. Each node's
plan claims its fixed ports on its own address, so a range must be free on both: one free on 127.0.0.1 alone may
be held on 127.0.0.2 (another test's plan of node 1, an HTTP double there) and fail that node's claim."""

from __future__ import annotations

from pdlaunch.config.addresses import port_is_free
from pdlaunch.launcher.ports import PortAllocator

NODE_HOSTS = ("127.0.0.1", "127.0.0.2")
ATTEMPTS = 50


def free_on_both(count: int, what: str) -> int:
    """First of `count` consecutive ports free on both node addresses now."""
    for _ in range(ATTEMPTS):
        base = PortAllocator(NODE_HOSTS[0]).free_range(count, what)
        if all(port_is_free(host, port) for host in NODE_HOSTS[1:] for port in range(base, base + count)):
            return base
    raise AssertionError(f"no {count} consecutive ports free on both {' and '.join(NODE_HOSTS)} in {ATTEMPTS} tries")
