"""Every URL pdlaunch writes brackets an IPv6 literal, as URLs need, through one helper (config/addresses.py
host_port, url_host): the plan's URLs, the Ray and SLURM backends' URLs, and the raylet probe's, the TP links' and the
node-port check's host:port. (Other messages still write a bare host:port.)"""

from __future__ import annotations

import pytest

from pdlaunch.config.addresses import host_port, url_host
from pdlaunch.launcher.backends.ray_unreachable import RayletProbe


@pytest.mark.parametrize(("host", "written"), [("10.0.0.2", "10.0.0.2:8000"), ("node1.example", "node1.example:8000"),
                                               ("fd00::2", "[fd00::2]:8000"), ("::1", "[::1]:8000")])
def test_an_ipv6_literal_is_bracketed_and_nothing_else(host: str, written: str) -> None:
    assert host_port(host, 8000) == written
    assert url_host(host) == written.rsplit(":", 1)[0]


def test_the_raylet_probe_names_an_ipv6_raylet_with_brackets() -> None:
    assert RayletProbe("fd00::2", 41000).where == "[fd00::2]:41000"
