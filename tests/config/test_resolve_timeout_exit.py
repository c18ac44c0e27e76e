"""A host name whose lookup hangs costs RESOLVE_TIMEOUT_S, also at the process's exit.

The lookup ran on a ThreadPoolExecutor's worker, "left behind" past the bound; but concurrent.futures joins its
workers when the interpreter exits, so `pdlaunch check-config --host NAME` said "did not resolve within 5s" and then
sat until getaddrinfo gave up (40 s here, a resolver's retries; for good on one that never answers). The lookup
hangs here in getaddrinfo, replaced in the child process for that one name."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from pdlaunch.config.addresses import RESOLVE_TIMEOUT_S

HANG_S = 300  # the lookup's hang: far past any bound the test allows
EXIT_BOUND_S = RESOLVE_TIMEOUT_S + 25.0  # the bound, plus the child's start and check-config's own work

HANGING_LOOKUP = textwrap.dedent(f"""
    import socket, sys, time

    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host == "hangs.example":
            time.sleep({HANG_S})
        return real(host, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo
""")

CHECK_CONFIG = HANGING_LOOKUP + textwrap.dedent("""
    from pdlaunch.cli import main

    sys.argv = ["pdlaunch", "check-config", "--model", "tiny", "--device", "cpu", "--colocated", "--host",
                "hangs.example"]
    main()
""")

PROBE_PORTS = HANGING_LOOKUP + textwrap.dedent("""
    from pdlaunch.config.addresses import probe_ports

    print(probe_ports([("hangs.example", 8000)])[("hangs.example", 8000)].reason, flush=True)
""")


def _run_bounded(script: str) -> tuple[int, str, float]:
    """The child's exit code, output and seconds to exit; fails the test when it runs past EXIT_BOUND_S."""
    started = time.monotonic()
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, text=True)
    try:
        out, _ = child.communicate(timeout=EXIT_BOUND_S)
    except subprocess.TimeoutExpired:
        child.kill()
        out, _ = child.communicate(timeout=10)
        raise AssertionError(f"still running {EXIT_BOUND_S:.0f}s on (the lookup hangs {HANG_S}s): {out}") from None
    return child.returncode, out, time.monotonic() - started


def test_check_config_with_a_host_whose_lookup_hangs_exits_within_the_bound() -> None:
    code, out, _ = _run_bounded(CHECK_CONFIG)
    assert code == 1, out
    assert f"'hangs.example' did not resolve within {RESOLVE_TIMEOUT_S:.0f}s" in out, out


def test_a_port_probe_of_a_host_whose_lookup_hangs_ends_within_the_bound() -> None:
    code, out, _ = _run_bounded(PROBE_PORTS)
    assert code == 0, out
    assert f"hangs.example did not resolve within {RESOLVE_TIMEOUT_S:.0f}s" in out, out
