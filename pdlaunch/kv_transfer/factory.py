"""Build the KV connector an instance's role and `kv_transfer.connector` ask for."""

from __future__ import annotations

from pdlaunch.config.models import DeploymentConfig, InstanceSpec
from pdlaunch.kv_transfer.base import KVConnector


def create_connector(config: DeploymentConfig, instance: InstanceSpec) -> KVConnector | None:
    """None for colocated instances (no KV moves); NixlConnector, MooncakeConnector or StorageConnector otherwise."""
    if instance.role == "colocated" or config.colocated:
        return None
    if config.kv_transfer.connector == "storage":
        from pdlaunch.kv_transfer.storage_connector import StorageConnector

        return StorageConnector(config, instance)
    if config.kv_transfer.connector == "mooncake":
        from pdlaunch.kv_transfer.mooncake_connector import MooncakeConnector

        return MooncakeConnector(config, instance)
    from pdlaunch.kv_transfer.nixl_connector import NixlConnector

    return NixlConnector(config, instance)
