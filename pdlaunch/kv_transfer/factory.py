"""Build the KV connector an instance's role and `kv_transfer.connector` ask for."""

from __future__ import annotations

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.kv_transfer.base import KVConnector


def create_connector(config: DeploymentConfig, instance: InstanceSpec,
                     staging_bytes: int | None = None) -> KVConnector | None:
    """None for colocated instances (no KV moves); the storage connector, or the prefill or decode role
    of the NIXL or Mooncake connector. `staging_bytes`: NIXL/Mooncake staging buffer (nixl_connector.py)."""
    if instance.role == "colocated" or config.colocated:
        return None
    if config.kv_transfer.connector == "storage":
        from pdlaunch.kv_transfer.storage_connector import StorageConnector

        return StorageConnector(config, instance)
    if config.kv_transfer.connector == "mooncake":
        from pdlaunch.kv_transfer.mooncake.connector import MooncakeDecode, MooncakePrefill

        if instance.role == "prefill":
            return MooncakePrefill(config, instance, staging_bytes)
        return MooncakeDecode(config, instance, staging_bytes)
    from pdlaunch.kv_transfer.decode.side import DecodeSide
    from pdlaunch.kv_transfer.prefill.side import PrefillSide

    if instance.role == "prefill":
        return PrefillSide(config, instance, staging_bytes)
    return DecodeSide(config, instance, staging_bytes)
