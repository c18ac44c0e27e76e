"""Ports held against other launchers on this host (config/port_reservations.py) as the launcher's allocator uses
them (launcher/ports.py): another launcher's configured port is refused naming the field and its holder, a free
pick goes around it, and the kernel gives a port back when its holder dies however it dies. The e2e of two
deployments started at once is test_two_deployments_e2e.py."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from pdlaunch.config.port_reservations import PortReservations, reservation_holder
from pdlaunch.errors import PdlaunchError
from pdlaunch.launcher.ports import PortAllocator
from tests.config.cli_helpers import check
from tests.serving.helpers import wait_for

HOST = "127.0.0.1"
HOLD = ("import sys; from pdlaunch.config.port_reservations import PortReservations; r = PortReservations(); "
        "[r.reserve(sys.argv[1], int(p)) for p in sys.argv[2:]]; sys.stdin.read()")


@pytest.fixture()
def other_launcher() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Another process holding three consecutive ports (as a launcher does for its deployment's run)."""
    base = PortAllocator(HOST).free_range(3, "held by the other launcher")
    proc = subprocess.Popen([sys.executable, "-c", HOLD, HOST, *(str(base + i) for i in range(3))],
                            stdin=subprocess.PIPE)
    try:
        wait_for(lambda: reservation_holder(HOST, base + 2) is not None, "the other process to hold its ports", 60)
        yield proc, base
    finally:
        proc.kill()
        proc.wait(30)


def test_a_port_another_launcher_holds_is_refused_naming_the_field_and_the_holder(
        other_launcher: tuple[subprocess.Popen[bytes], int]) -> None:
    proc, base = other_launcher
    mine = PortReservations()
    with pytest.raises(PdlaunchError) as refused:
        PortAllocator(HOST, mine).claim(base + 1, "instances[1].base_port", "decode-0 HTTP")
    assert refused.value.field == "instances[1].base_port"
    assert f"port {base + 1} (decode-0 HTTP) on {HOST} belongs to another pdlaunch deployment" in refused.value.message
    assert f"pid {proc.pid}: " in refused.value.message and "port_reservations" in refused.value.message
    assert mine.held == []


def test_a_free_pick_goes_around_held_ports_and_holds_its_own(
        other_launcher: tuple[subprocess.Popen[bytes], int], monkeypatch: pytest.MonkeyPatch) -> None:
    _, base = other_launcher
    tried: list[int] = []
    forced = iter([base + 1, base - 1])  # the first two ranges overlap the held ports; then random ones
    draw = random.Random.randrange

    def randrange(rng: random.Random, low: int, high: int) -> int:
        tried.append(next(forced, None) or draw(rng, low, high))
        return tried[-1]

    monkeypatch.setattr(random.Random, "randrange", randrange)
    mine = PortReservations()
    first = PortAllocator(HOST, mine).free_range(2, "side channel")
    assert tried[:2] == [base + 1, base - 1] and first == tried[-1] and len(tried) >= 3
    assert mine.held == [(HOST, first), (HOST, first + 1)]  # nothing of the refused ranges is kept
    assert reservation_holder(HOST, base - 1) is None
    mine.release()
    assert reservation_holder(HOST, first) is None


def test_a_killed_holder_leaves_its_ports_free(other_launcher: tuple[subprocess.Popen[bytes], int]) -> None:
    proc, base = other_launcher
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert reservation_holder(HOST, base) is None
    mine = PortReservations()
    assert PortAllocator(HOST, mine).claim(base, "proxy.port", "proxy") == base
    assert reservation_holder(HOST, base) is not None
    mine.release()


def test_a_port_in_use_is_not_held_after_the_refusal() -> None:
    mine = PortReservations()
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(PdlaunchError, match="already in use"):
            PortAllocator(HOST, mine).claim(port, "proxy.port", "proxy")
    assert mine.held == [] and reservation_holder(HOST, port) is None


def test_one_port_on_two_addresses_is_two_reservations() -> None:
    """Two nodes of a multi-node test on one machine (127.0.0.1, 127.0.0.2) bind the same port numbers."""
    port = PortAllocator(HOST).free("either node")
    node0, node1 = PortReservations(), PortReservations()
    assert node0.reserve(HOST, port) is None
    assert node1.reserve("127.0.0.2", port) is None
    assert node1.reserve(HOST, port) is not None
    node0.release()
    node1.release()


def test_check_config_warns_of_a_port_another_launcher_holds(
        other_launcher: tuple[subprocess.Popen[bytes], int]) -> None:
    """A deployment that is starting holds its ports before its children bind them: check-config's "in use now"
    counts them, as serve would refuse them."""
    _, base = other_launcher
    result = check(["--model", "tiny", "--device", "cpu", "--port", str(base)])
    assert result.exit_code == 0, result.output
    assert f"warning: --port: port {base} (proxy) on 127.0.0.1: {base} in use now" in result.output, result.output


def test_a_free_pick_of_a_plan_that_holds_nothing_goes_around_held_ports(
        other_launcher: tuple[subprocess.Popen[bytes], int], monkeypatch: pytest.MonkeyPatch) -> None:
    """`bench compare` and `smoke` pick their proxy port with an allocator that holds nothing, before the
    deployment claims it: a port another launcher holds (its children not bound yet) was picked, and the claim
    then refused it as another deployment's, a port the user never chose."""
    _, base = other_launcher
    tried: list[int] = []
    forced = iter([base + 1])
    draw = random.Random.randrange

    def randrange(rng: random.Random, low: int, high: int) -> int:
        tried.append(next(forced, None) or draw(rng, low, high))
        return tried[-1]

    monkeypatch.setattr(random.Random, "randrange", randrange)
    picked = PortAllocator(HOST).free("the proxy")
    assert tried[0] == base + 1 and picked == tried[-1] and len(tried) >= 2
    assert reservation_holder(HOST, picked) is None  # looked at, not held


@pytest.mark.parametrize("theirs,mine", [("0.0.0.0", HOST), (HOST, "0.0.0.0")])
def test_a_port_held_on_every_address_and_on_one_are_one_port(theirs: str, mine: str) -> None:
    """A server on 0.0.0.0 takes the port on every address of the host, so a deployment whose proxy binds
    --host 0.0.0.0 --port 8000 and one on 127.0.0.1:8000 cannot both run: the second launcher, started while the
    first's instances loaded (its proxy binds last, after them), found the port free and held under another name,
    and one of the two proxies failed on 'address already in use' once everything had loaded."""
    port = PortAllocator(HOST).free("both deployments' proxy")
    proc = subprocess.Popen([sys.executable, "-c", HOLD, theirs, str(port)], stdin=subprocess.PIPE)
    try:
        wait_for(lambda: reservation_holder(theirs, port) is not None, "the other process to hold its port", 60)
        assert (reservation_holder(mine, port) or "").startswith(f"pid {proc.pid}: ")  # check-config's view too
        held = PortReservations()
        with pytest.raises(PdlaunchError) as refused:
            PortAllocator(mine, held).claim(port, "proxy.port", "proxy")
        assert f"belongs to another pdlaunch deployment on this host, starting or running (pid {proc.pid}: " \
            in refused.value.message
        assert held.held == []
    finally:
        proc.kill()
        proc.wait(30)


@pytest.mark.parametrize("first,second", [("::", "::0"), ("::0", "0:0:0:0:0:0:0:0"), ("::1", "0:0:0:0:0:0:0:1"),
                                          ("LocalHost", "localhost"), ("127.0.0.1", "::ffff:127.0.0.1"),
                                          ("::FFFF:7f00:1", "127.0.0.1")])
def test_spellings_of_one_address_are_one_reservation(first: str, second: str) -> None:
    """`::0` and `0:0:0:0:0:0:0:0` are `::` as a bind takes them (and a host name's case does not matter): held under
    another name, a second launcher's claim of the port found it free, and one of the two servers failed on 'address
    already in use'; a launcher holding a port under one spelling refused it to itself under another. An
    IPv4-mapped IPv6 address (`::ffff:127.0.0.1`) is its IPv4 address to a bind: the kernel refuses one while the
    other is bound."""
    port = PortAllocator(HOST).free("both deployments' proxy")
    theirs, mine = PortReservations(), PortReservations()
    try:
        assert theirs.reserve(first, port) is None
        assert (reservation_holder(second, port) or "").startswith("pid ")
        assert mine.reserve(second, port) is not None and mine.held == []
        assert theirs.reserve(second, port) is None and len(theirs.held) == 1  # ours already, under one name
        theirs.release_port(second, port)
        assert theirs.held == [] and reservation_holder(first, port) is None
    finally:
        theirs.release()
        mine.release()


@pytest.mark.parametrize("wildcard", ["::0", "0:0:0:0:0:0:0:0", "0::", "::ffff:0.0.0.0"])
def test_a_wildcard_however_written_overlaps_every_address(wildcard: str) -> None:
    """Any spelling of :: takes the port on every address, as `::` does (and `::ffff:0.0.0.0`, 0.0.0.0 mapped into
    IPv6, on every IPv4 one): a port held there and one held on 127.0.0.1 exclude each other, in either order."""
    port = PortAllocator(HOST).free("both deployments' proxy")
    for theirs_host, mine_host in ((wildcard, HOST), (HOST, wildcard)):
        theirs, mine = PortReservations(), PortReservations()
        try:
            assert theirs.reserve(theirs_host, port) is None
            assert (reservation_holder(mine_host, port) or "").startswith("pid "), (theirs_host, mine_host)
            assert mine.reserve(mine_host, port) is not None and mine.held == [], (theirs_host, mine_host)
        finally:
            theirs.release()
            mine.release()


def test_the_holder_is_named_however_many_launchers_ask(other_launcher: tuple[subprocess.Popen[bytes], int]) -> None:
    """A holder listened with a backlog of 8 and never accepted, so every asker's connection stayed queued: from
    the tenth question on (a busy host's free picks ask at every held port they meet) the refusal said "another
    pdlaunch launcher on this host (it did not say which)" instead of the holder's pid and command."""
    proc, base = other_launcher
    mine = PortReservations()
    for _ in range(40):
        assert (reservation_holder(HOST, base) or "").startswith(f"pid {proc.pid}: ")
    for _ in range(10):
        with pytest.raises(PdlaunchError) as refused:
            PortAllocator(HOST, mine).claim(base + 1, "instances[1].base_port", "decode-0 HTTP")
        assert f"(pid {proc.pid}: " in refused.value.message, refused.value.message


def test_the_holder_is_named_in_this_process_too() -> None:
    """The same from another PortReservations of the launcher's own process (check-config's, smoke's view)."""
    port = PortAllocator(HOST).free("held here")
    theirs = PortReservations()
    try:
        assert theirs.reserve(HOST, port) is None
        for _ in range(40):
            assert (reservation_holder(HOST, port) or "").startswith(f"pid {os.getpid()}: ")
    finally:
        theirs.release()
    assert reservation_holder(HOST, port) is None


@pytest.mark.parametrize("theirs_host,mine_host", [("localhost", HOST), (HOST, "localhost")])
def test_localhost_and_its_address_are_one_port(theirs_host: str, mine_host: str) -> None:
    """`localhost` is 127.0.0.1 to a bind: held under the name, another launcher's claim of 127.0.0.1 found the port
    free, and both deployments' servers then bound it, one failing on 'address already in use'."""
    port = PortAllocator(HOST).free("both deployments' proxy")
    proc = subprocess.Popen([sys.executable, "-c", HOLD, theirs_host, str(port)], stdin=subprocess.PIPE)
    try:
        wait_for(lambda: reservation_holder(theirs_host, port) is not None, "the other process to hold its port", 60)
        assert (reservation_holder(mine_host, port) or "").startswith(f"pid {proc.pid}: ")
        held = PortReservations()
        with pytest.raises(PdlaunchError) as refused:
            PortAllocator(mine_host, held).claim(port, "proxy.port", "proxy")
        assert refused.value.field == "proxy.port"
        assert f"port {port} (proxy) on {mine_host} belongs to another pdlaunch deployment on this host, starting " \
            f"or running (pid {proc.pid}: " in refused.value.message
        assert held.held == []
    finally:
        proc.kill()
        proc.wait(30)


def test_a_name_is_held_on_every_address_it_resolves_to(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where /etc/hosts gives localhost both 127.0.0.1 and ::1, a server on `localhost` may take either: the name
    holds the port on both, so a launcher on either address is refused, and one on the name by a launcher on
    either."""
    name = "both-families.pdlaunch.test"  # looked up once per process: a name of this test alone
    real = socket.getaddrinfo

    def getaddrinfo(host: str, *args: object, **kwargs: object) -> list[tuple[object, ...]]:
        if host == name:
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 0, 0, 0)),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))]
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    port = PortAllocator(HOST).free("both deployments' proxy")
    theirs, mine = PortReservations(), PortReservations()
    try:
        assert theirs.reserve(name, port) is None
        assert theirs.held == [("127.0.0.1", port), ("::1", port)]
        for address in ("127.0.0.1", "::1", name):
            assert (mine.reserve(address, port) or "").startswith(f"pid {os.getpid()}: "), address
            assert mine.held == []
        assert theirs.reserve("::1", port) is None and len(theirs.held) == 2  # ours already
        theirs.release_port(name, port)
        assert theirs.held == [] and reservation_holder("::1", port) is None
        assert mine.reserve(HOST, port) is None  # free on 127.0.0.1 now: the other address is held by nobody either
        assert (theirs.reserve(name, port) or "").startswith("pid ") and theirs.held == []  # nothing half-held
    finally:
        theirs.release()
        mine.release()


def _depth(text: str) -> int:
    """How deep parentheses nest in `text`."""
    depth = deepest = 0
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        deepest = max(deepest, depth)
    return deepest


def _process_state(pid: int) -> str:
    """The state letter of process `pid` (/proc/PID/stat: R running, S sleeping, T stopped, ...)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_a_holder_that_does_not_answer_is_refused_in_one_plain_sentence(
        other_launcher: tuple[subprocess.Popen[bytes], int]) -> None:
    """A stopped holder (SIGSTOP) whose backlog is full of askers cannot say who it is: the refusal read "... starting
    or running (another pdlaunch launcher on this host (it did not answer: is it stopped?))"."""
    proc, base = other_launcher
    askers: list[socket.socket] = []
    proc.send_signal(signal.SIGSTOP)
    try:
        # A signal takes effect a moment later: until the holder is stopped its thread still answers askers.
        wait_for(lambda: _process_state(proc.pid) == "T", "the holder to be stopped (state T)", 60.0)
        for _ in range(1000):  # fill the backlog its stopped thread no longer empties
            asker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            asker.setblocking(False)
            askers.append(asker)
            try:
                asker.connect(f"\0pdlaunch-port:{HOST}:{base + 1}".encode())
            except BlockingIOError:
                break
        else:
            pytest.fail("the holder's backlog did not fill up")
        with pytest.raises(PdlaunchError) as refused:
            PortAllocator(HOST, PortReservations()).claim(base + 1, "instances[1].base_port", "decode-0 HTTP")
    finally:
        proc.send_signal(signal.SIGCONT)
        for asker in askers:
            asker.close()
    assert refused.value.message == (
        f"port {base + 1} (decode-0 HTTP) on {HOST} belongs to another pdlaunch deployment on this host, starting or "
        "running (its launcher did not say which it is within 2s: is it stopped?)"), refused.value.message
    assert _depth(refused.value.message) == 1


def test_a_holder_that_cannot_be_asked_is_refused_in_one_plain_sentence(
        other_launcher: tuple[subprocess.Popen[bytes], int], monkeypatch: pytest.MonkeyPatch) -> None:
    _, base = other_launcher
    real_connect = socket.socket.connect

    def connect(sock: socket.socket, address: object) -> None:
        if sock.family == socket.AF_UNIX:
            raise PermissionError(1, "Operation not permitted")  # a sandbox refusing unix connects (seccomp)
        real_connect(sock, address)  # type: ignore[arg-type]

    monkeypatch.setattr(socket.socket, "connect", connect)
    with pytest.raises(PdlaunchError) as refused:
        PortAllocator(HOST, PortReservations()).claim(base + 1, "instances[1].base_port", "decode-0 HTTP")
    assert refused.value.message.endswith(
        "starting or running (asking its launcher which it is failed: Operation not permitted)"), refused.value.message
    assert _depth(refused.value.message) == 1
