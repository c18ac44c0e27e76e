"""The `kv_transfer` section: how KV moves from prefill to decode instances."""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import Field

from pdlaunch.config.addresses import Host
from pdlaunch.config.strict_model import MAX_SECONDS, StrictModel


class KVTransferConfig(StrictModel):
    connector: Literal["nixl", "mooncake", "storage"] = Field(
        "nixl", description="How KV moves from prefill to decode.")
    transfer_mode: Literal["auto", "pull", "push"] = Field(
        "auto", description="pull: decode READs; push: prefill WRITEs; auto: push where pull cannot work."
    )
    engine_id: str = Field(default_factory=lambda: uuid.uuid4().hex, description="Base engine id of instances.")
    side_channel_host: Host = Field("127.0.0.1", description="Host the handshake side channel binds to.")
    side_channel_port: int | None = Field(None, description="First side-channel port; default: free ports.")
    kv_lease_seconds: float = Field(60.0, gt=0, le=MAX_SECONDS, description="Prefill frees unread KV blocks after "
                                    "this (at most a week).")
    handshake_timeout_seconds: float = Field(10.0, gt=0, le=MAX_SECONDS, description="Decode gives up a handshake "
                                             "after this (at most a week).")
    transfer_timeout_seconds: float = Field(30.0, gt=0, le=MAX_SECONDS, description="Decode fails a request whose "
                                            "KV is late (at most a week).")
    storage_path: str = Field("~/.cache/pdlaunch/kv", description="Directory of the storage connector.")
    verify_kv: bool = Field(False, description="Checksum every transferred request end to end.")
    load_failure_policy: Literal["recompute", "fail"] = Field(
        "recompute", description="When a decode cannot load a request's KV (prefill gone, lease expired, "
        "transfer failed): recompute the prompt locally and answer normally, or fail the request (502). The proxy "
        "reads it too: a prompt whose prefill leg can run on no prefill (stalled, gone, none ready) goes to the "
        "decode alone under recompute, and fails under fail (504 for a stall, else 503 no_instance).")
    mooncake_protocol: Literal["auto", "tcp", "rdma"] = Field(
        "auto",
        description="Mooncake transport (connector mooncake): auto = rdma where an RDMA device exists, else tcp.")
    mooncake_metadata_server: str | None = Field(
        None, min_length=1, description="Mooncake metadata server (etcd://host:port, http://...); "
        "None: peers exchange metadata directly (P2P handshake), enough on one host and across hosts.")
