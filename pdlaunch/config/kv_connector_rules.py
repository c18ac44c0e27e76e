"""What the chosen KV connector needs on this host: check-config says what is missing before serve."""

from __future__ import annotations

from pdlaunch.config import mooncake_install
from pdlaunch.config.models import DeploymentConfig
from pdlaunch.config.problems import Problem, problem


def kv_connector_problems(cfg: DeploymentConfig) -> list[Problem]:
    """Mooncake: the package and the system libraries it links import here, a CUDA build for a CUDA KV
    cache, an RDMA device for rdma."""
    if cfg.colocated or cfg.kv_transfer.connector != "mooncake":
        return []
    reason = mooncake_install.missing_reason()
    if reason is not None:
        return [problem("kv_transfer.connector", f"the mooncake connector is chosen but {reason}",
                        mooncake_install.INSTALL_HINT)]
    if cfg.device == "cuda" and mooncake_install.cpu_only_build():
        return [problem("kv_transfer.connector", "the KV cache is on CUDA but the Mooncake installed here is the "
                        "CPU-only wheel (mooncake-transfer-engine-non-cuda)",
                        "pip install mooncake-transfer-engine (CUDA 12) or mooncake-transfer-engine-cuda13")]
    if cfg.kv_transfer.mooncake_protocol == "rdma" and mooncake_install.resolve_protocol("auto")[0] != "rdma":
        return [problem("kv_transfer.mooncake_protocol", "rdma is chosen but this host lists no RDMA device "
                        f"({mooncake_install.RDMA_DEVICES})", "use mooncake_protocol auto or tcp")]
    return []
