"""Whether Mooncake can run on this host: its wheel, the system libraries it links, RDMA devices.

Read by check-config (config/rules/host.py) before anything starts, by `bench kv-transfer`,
and by the Mooncake transfer engine itself (kv_transfer/mooncake/engine.py) before it loads. It sits
below kv_transfer/ so that check-config asks without importing the transfer code.
"""

from __future__ import annotations

import importlib.metadata
import os
import re

PACKAGE = "mooncake-transfer-engine-non-cuda"  # CPU; on CUDA hosts mooncake-transfer-engine (CUDA 12)
SYSTEM_LIBRARIES = "libibverbs1 librdmacm1 libnuma1"
INSTALL_HINT = (f"pip install 'pdlaunch[mooncake]' (or {PACKAGE}; mooncake-transfer-engine on CUDA 12 hosts), "
                f"and on Debian/Ubuntu: apt-get install {SYSTEM_LIBRARIES}; or use --kv-connector nixl")
RDMA_DEVICES = "/sys/class/infiniband"


def missing_reason() -> str | None:
    """What keeps `mooncake.engine` from importing here (the package, or a system library it links), or None."""
    # Mooncake reads its log level when it loads, and logs every handshake and batch at INFO to stderr:
    # our logs keep its warnings and errors.
    os.environ.setdefault("MC_LOG_LEVEL", "WARNING")
    try:
        from mooncake import engine  # noqa: F401
    except ImportError as e:
        text = str(e)
        if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == "mooncake":
            return f"the Mooncake transfer engine package is not installed ({PACKAGE})"
        library = re.search(r"(lib[\w+-]+\.so[.\d]*)", text)
        if library:
            return f"the system library {library.group(1)} that Mooncake links is missing ({text})"
        return f"mooncake.engine cannot be imported: {text}"
    return None


def cpu_only_build() -> bool:
    """Whether the Mooncake installed here is the CPU-only wheel, which cannot move GPU memory."""
    cuda_builds = ("mooncake-transfer-engine", "mooncake-transfer-engine-cuda13")
    return _installed(PACKAGE) and not any(_installed(name) for name in cuda_builds)


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def resolve_protocol(configured: str) -> tuple[str, str]:
    """(protocol, why): auto is rdma where the kernel lists an RDMA device, else tcp."""
    if configured != "auto":
        return configured, f"kv_transfer.mooncake_protocol is {configured}"
    devices = sorted(os.listdir(RDMA_DEVICES)) if os.path.isdir(RDMA_DEVICES) else []
    if devices:
        return "rdma", f"RDMA device(s) {', '.join(devices)} found in {RDMA_DEVICES}"
    return "tcp", f"no RDMA device in {RDMA_DEVICES}"
