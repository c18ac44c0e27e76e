from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.config.engine_config import CacheConfig, ModelConfig, SchedulerConfig
from pdlaunch.config.kv_transfer_config import KVTransferConfig
from pdlaunch.config.proxy_config import ProxyConfig
from pdlaunch.config.topology_config import InstanceGroupConfig, ParallelConfig

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
