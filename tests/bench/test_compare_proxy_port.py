"""`pdlaunch bench compare` picks each deployment's proxy port itself. It must pick it free on the address the proxy
binds (proxy.host of --config): a proxy on 0.0.0.0 takes the port on every address, so a port in use on another
address of this machine is not free for it, though a bind test on 127.0.0.1 alone finds it free."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdlaunch.bench import compare_layout
from pdlaunch.bench.compare_config import CompareConfig
from pdlaunch.bench.compare_layout import Layout
from pdlaunch.errors import ConfigError
from pdlaunch.launcher import ports


class _Picks:
    """random.Random's stand-in in launcher/ports.py: `first` first, then the ports after it."""

    def __init__(self, first: int) -> None:
        self._next = first

    def __call__(self) -> _Picks:
        return self

    def randrange(self, low: int, high: int) -> int:
        pick, self._next = self._next, self._next + 1
        return pick


@pytest.fixture()
def busy_elsewhere() -> Iterator[int]:
    """A port in the launcher's free range that a server listens on at 127.0.0.2 (free on 127.0.0.1)."""
    for port in range(24000, 25000):
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.2", port))
        except OSError:
            sock.close()
            continue
        sock.listen()
        with sock:
            yield port
        return
    pytest.skip("no free port on 127.0.0.2")


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.2"])
def test_the_proxy_port_is_free_on_the_address_the_proxy_binds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               busy_elsewhere: int, host: str) -> None:
    base = tmp_path / "base.yaml"
    base.write_text(f"proxy:\n  host: '{host}'\n")
    cfg = CompareConfig(model="tiny", rates=[2.0], out=tmp_path / "out", device="cpu", config=base)
    layout = Layout(device="cpu", gpus=[], colocated=2, prefill=1, decode=1)
    monkeypatch.setattr(ports.random, "Random", _Picks(busy_elsewhere))
    deployment = compare_layout.deployment_config(cfg, layout, "pd")
    assert deployment.proxy.host == host
    assert deployment.proxy.port != busy_elsewhere


def test_a_loopback_proxy_may_take_a_port_used_on_another_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  busy_elsewhere: int) -> None:
    """The default proxy.host, 127.0.0.1: a server on 127.0.0.2 does not hold its port (the check is the bind's)."""
    cfg = CompareConfig(model="tiny", rates=[2.0], out=tmp_path / "out", device="cpu")
    layout = Layout(device="cpu", gpus=[], colocated=2, prefill=1, decode=1)
    monkeypatch.setattr(ports.random, "Random", _Picks(busy_elsewhere))
    deployment = compare_layout.deployment_config(cfg, layout, "pd")
    assert (deployment.proxy.host, deployment.proxy.port) == ("127.0.0.1", busy_elsewhere)


def test_a_proxy_host_of_another_machine_is_named_as_the_config_key(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("proxy:\n  host: 192.0.2.1\n")  # TEST-NET-1: never an address of this machine
    cfg = CompareConfig(model="tiny", rates=[2.0], out=tmp_path / "out", device="cpu", config=base)
    layout = Layout(device="cpu", gpus=[], colocated=2, prefill=1, decode=1)
    with pytest.raises(ConfigError) as caught:
        compare_layout.deployment_config(cfg, layout, "pd")
    assert [p.field for p in caught.value.problems] == ["proxy.host (in --config)"], caught.value.problems
