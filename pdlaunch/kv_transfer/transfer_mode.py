"""pull | push | auto: which side initiates the NIXL transfer, and why (docs/ARCHITECTURE.md "Measured facts").

pull (decode READs) needs NVLink between the two GPUs: UCX disables cuda_ipc GET without it, and on
one GPU shared by prefill and decode it fails too. push (prefill WRITEs) works everywhere. On CPU,
UCX moves DRAM between processes in both directions, so pull is used.
"""

from __future__ import annotations

import logging
import subprocess
from functools import lru_cache

from pdlaunch.kv_transfer.handshake import DeviceInfo

logger = logging.getLogger(__name__)


def _norm_bus_id(bus_id: str) -> str:
    # NVML reports "00000000:1B:00.0", torch gives what we format in handshake.device_info.
    return bus_id.strip().lower()[-12:]


@lru_cache(maxsize=64)
def nvlink_between(bus_a: str, bus_b: str) -> bool | None:
    """True/False when NVML can tell whether an NVLink joins the two GPUs, None when it cannot."""
    try:
        import pynvml  # type: ignore[import-not-found]  # optional (nvidia-ml-py), untyped
    except ImportError:
        return _nvlink_from_nvidia_smi(bus_a, bus_b)
    try:
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus_a)
            for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
                try:
                    if pynvml.nvmlDeviceGetNvLinkState(handle, link) != pynvml.NVML_FEATURE_ENABLED:
                        continue
                    remote = pynvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId
                except pynvml.NVMLError:
                    continue
                remote = remote.decode() if isinstance(remote, bytes) else remote
                if _norm_bus_id(remote) == _norm_bus_id(bus_b):
                    return True
            # H100/H200 boards on NVSwitch: links lead to the switch, not to the peer GPU.
            p2p = pynvml.nvmlDeviceGetP2PStatus(
                handle, pynvml.nvmlDeviceGetHandleByPciBusId(bus_b), pynvml.NVML_P2P_CAPS_INDEX_NVLINK
            )
            return bool(p2p == pynvml.NVML_P2P_STATUS_OK)
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # no driver, old NVML without the call: fall back to the CLI
        logger.debug("NVML could not tell NVLink between %s and %s: %s", bus_a, bus_b, e)
        return _nvlink_from_nvidia_smi(bus_a, bus_b)


def _nvlink_from_nvidia_smi(bus_a: str, bus_b: str) -> bool | None:
    """Parse `nvidia-smi topo -m` (NV# in the matrix = NVLink); None when it is not available."""
    try:
        ids = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,pci.bus_id", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
        topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=10,
                              check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    index_of = {}
    for line in ids.splitlines():
        idx, _, bus = line.partition(",")
        index_of[_norm_bus_id(bus)] = idx.strip()
    a, b = index_of.get(_norm_bus_id(bus_a)), index_of.get(_norm_bus_id(bus_b))
    if a is None or b is None:
        return None
    for line in topo.splitlines():
        cells = line.split()
        if cells and cells[0] == f"GPU{a}" and len(cells) > int(b) + 1:
            return cells[int(b) + 1].startswith("NV")
    return None


def resolve_transfer_mode(configured: str, local: DeviceInfo, remote: DeviceInfo) -> tuple[str, str]:
    """(mode, reason) for a decode engine on `local` loading from a prefill engine on `remote`."""
    if configured in ("pull", "push"):
        return configured, f"kv_transfer.transfer_mode is {configured}"
    if local.type == "cpu" and remote.type == "cpu":
        return "pull", "CPU DRAM on both sides: UCX reads between processes, so decode pulls"
    if local.type != remote.type:
        return "push", f"prefill KV is in {remote.type} memory, decode KV in {local.type}: push works for any pair"
    if local.host_id != remote.host_id:
        return "push", "prefill and decode run on different hosts: push (WRITE) works over any UCX transport"
    if local.pci_bus_id == remote.pci_bus_id:
        return "push", (
            f"prefill and decode share GPU {local.pci_bus_id}: pull needs NVLink between two GPUs "
            "(UCX disables cuda_ipc GET without it), push works"
        )
    linked = nvlink_between(local.pci_bus_id, remote.pci_bus_id)
    if linked:
        return "pull", f"NVLink joins GPUs {remote.pci_bus_id} (prefill) and {local.pci_bus_id} (decode)"
    why = "no NVLink" if linked is False else "NVLink could not be detected (no NVML / nvidia-smi)"
    return "push", f"{why} between GPUs {remote.pci_bus_id} and {local.pci_bus_id}: pull would fail, push works"
