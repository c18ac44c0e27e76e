"""Where one request's KV lies on one prefill rank: the part of kv_transfer_params a decode load uses,
as a typed value built once at the connector's boundary (params.py validated the raw params before)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from pdlaunch.errors import KVTransferError


class RemoteKV(BaseModel):
    model_config = ConfigDict(frozen=True)

    engine_id: str
    request_id: str | None  # None: unsigned push params that name only the client's X-Request-Id
    host: str
    port: int
    tp_size: int = 1
    tp_rank: int | None = None  # set when a resharding load talks to one rank of several
    kv_epoch: int = 0  # grows when the prefill engine registers its KV again (after a wake-up)
    block_ids: list[list[int]] | None = None  # per KV-cache group; None: ask the prefill ("held_blocks")
    checksums: list[list[str]] | None = None  # per group, per block (kv_transfer.verify_kv)
    num_prompt_tokens: int | None = None
    # A prefill of another TP size (reshard.py): KV heads per rank, and each rank's side channel and digests.
    kv_heads_per_rank: int | None = None
    rank_ports: list[int] | None = None
    rank_checksums: list[list[list[str]] | None] | None = None

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> RemoteKV:
        """From validated kv_transfer_params (params.PrefillAnswer or push_params.UnsignedPush fields)."""
        missing = [k for k in ("remote_engine_id", "remote_host", "remote_port") if params.get(k) is None]
        if missing:
            raise KVTransferError(f"kv_transfer_params lack {', '.join(missing)}",
                                  hint="send decode the kv_transfer_params the prefill response carried")
        return cls(
            engine_id=str(params["remote_engine_id"]), request_id=params.get("remote_request_id"),
            host=str(params["remote_host"]), port=int(params["remote_port"]), tp_size=int(params.get("tp_size") or 1),
            kv_epoch=int(params.get("kv_epoch") or 0), block_ids=params.get("remote_block_ids"),
            checksums=params.get("kv_checksum"), num_prompt_tokens=params.get("num_prompt_tokens"),
            kv_heads_per_rank=params.get("kv_heads_per_rank"), rank_ports=params.get("remote_ports"),
            rank_checksums=params.get("rank_kv_checksums"),
        )

    @property
    def where(self) -> str:
        return f"prefill engine {self.engine_id} at {self.host}:{self.port}"

    @property
    def held_request_id(self) -> str:
        """The prefill's request id (known once the load asked for the block ids, if it had to)."""
        return self.request_id or ""
