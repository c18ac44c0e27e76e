from pdlaunch.config.models import (
    CacheConfig,
    DeploymentConfig,
    InstanceGroupConfig,
    InstanceSpec,
    KVTransferConfig,
    ModelConfig,
    ParallelConfig,
    ProxyConfig,
    SchedulerConfig,
)

__all__ = [
    "CacheConfig",
    "DeploymentConfig",
    "InstanceGroupConfig",
    "InstanceSpec",
    "KVTransferConfig",
    "ModelConfig",
    "ParallelConfig",
    "ProxyConfig",
    "SchedulerConfig",
]
