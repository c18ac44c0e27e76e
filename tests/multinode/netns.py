"""Two "nodes" on one machine: network namespaces joined by a veth pair, each with its own address.

Needs root and iproute2; `TwoNodes.create()` raises NamespacesUnavailable (the reason) otherwise.
Every namespace and veth it made is removed by `delete()`, also after a half-finished create.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

IP_TIMEOUT_S = 10.0
SUBNET = "10.77.0"  # node k has address 10.77.0.(k+1)/24 on its end of the veth


class NamespacesUnavailable(Exception):
    """Network namespaces cannot be made here (not root, no `ip`, or the kernel refused)."""


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, ["ip", *args], done.stdout, done.stderr)
    return done.stdout


@dataclass
class TwoNodes:
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    made: list[str] = field(default_factory=list)  # namespaces created so far

    @property
    def namespaces(self) -> list[str]:
        return [f"pdl-{self.tag}-a", f"pdl-{self.tag}-b"]

    @property
    def veths(self) -> list[str]:  # interface names: at most 15 characters
        return [f"pdl{self.tag}a", f"pdl{self.tag}b"]

    @property
    def addresses(self) -> list[str]:
        return [f"{SUBNET}.1", f"{SUBNET}.2"]

    def create(self) -> TwoNodes:
        if os.geteuid() != 0:
            raise NamespacesUnavailable("creating network namespaces needs root (CI runs this test as root)")
        if shutil.which("ip") is None:
            raise NamespacesUnavailable("iproute2's `ip` is not installed")
        try:
            for ns in self.namespaces:
                _ip("netns", "add", ns)
                self.made.append(ns)
        except subprocess.CalledProcessError as e:
            self.delete()
            raise NamespacesUnavailable(f"`ip netns add` failed: {e.stderr.strip()}") from e
        try:
            _ip("link", "add", self.veths[0], "type", "veth", "peer", "name", self.veths[1])
            for ns, veth, address in zip(self.namespaces, self.veths, self.addresses):
                _ip("link", "set", veth, "netns", ns)
                _ip("-n", ns, "addr", "add", f"{address}/24", "dev", veth)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "link", "set", veth, "up")
        except subprocess.CalledProcessError as e:
            self.delete()
            raise NamespacesUnavailable(f"setting up the veth pair failed: {e.cmd}: {e.stderr.strip()}") from e
        return self

    def exec_argv(self, node: int, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[node], *argv]

    def rx_bytes(self, node: int) -> int:
        """Bytes node `node`'s veth end has received (its counters, read inside its namespace)."""
        path = Path("/sys/class/net") / self.veths[node] / "statistics" / "rx_bytes"
        out = subprocess.run(self.exec_argv(node, ["cat", str(path)]), capture_output=True, text=True,
                             timeout=IP_TIMEOUT_S, check=True).stdout
        return int(out)

    def pids(self) -> list[int]:
        """Processes still running inside either namespace."""
        pids: list[int] = []
        for ns in self.made:
            try:
                pids += [int(p) for p in _ip("netns", "pids", ns).split()]
            except subprocess.CalledProcessError:
                pass
        return pids

    def delete(self) -> None:
        """Kill what is left inside the namespaces (only this test's processes live there), then remove
        them; the veth pair goes with them. Safe to call twice."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + IP_TIMEOUT_S
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        for ns in list(self.made):
            try:
                _ip("netns", "del", ns)
            except subprocess.CalledProcessError:
                continue
            self.made.remove(ns)
        try:  # a veth left in the root namespace by a half-finished create
            _ip("link", "del", self.veths[0])
        except subprocess.CalledProcessError:
            pass


_CLONE_NEWNET = 0x40000000


def call_in_namespace(namespace: str, fn: Callable[[], T], timeout: float) -> T:
    """`fn()` on a fresh thread that joined `namespace`'s network (setns is per thread): the sockets it
    opens live there, this process's other threads stay where they are."""
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/var/run/netns/{namespace}", "rb") as f:
                if libc.setns(f.fileno(), _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {namespace} failed")
            result.append(fn())
        except BaseException as e:  # re-raised on the caller's thread
            errors.append(e)

    thread = threading.Thread(target=run, name=f"in-{namespace}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"a call inside namespace {namespace} did not finish within {timeout:.0f}s")
    if errors:
        raise errors[0]
    return result[0]
