"""Where one request's KV lies on one prefill rank: the part of kv_transfer_params a decode load uses,
built from the params models the engine's boundary parsed (params.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.params import PrefillAnswer, UnsignedPush


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
    def from_params(cls, params: PrefillAnswer | UnsignedPush) -> RemoteKV:
        """Where the params say the prompt's KV lies (an unsigned push names no blocks: ask the prefill)."""
        if isinstance(params, UnsignedPush):
            return cls(engine_id=params.remote_engine_id, request_id=params.remote_request_id,
                       host=params.remote_host, port=params.remote_port, tp_size=params.tp_size or 1)
        if params.remote_host is None or params.remote_port is None:
            missing = [k for k in ("remote_host", "remote_port") if getattr(params, k) is None]
            raise KVTransferError(f"kv_transfer_params lack {', '.join(missing)}",
                                  hint="send decode the kv_transfer_params the prefill response carried")
        return cls(
            engine_id=params.remote_engine_id, request_id=params.remote_request_id, host=params.remote_host,
            port=params.remote_port, tp_size=params.tp_size, kv_epoch=params.kv_epoch or 0,
            block_ids=params.remote_block_ids, checksums=params.kv_checksum, num_prompt_tokens=params.num_prompt_tokens,
            kv_heads_per_rank=params.kv_heads_per_rank, rank_ports=params.remote_ports,
            rank_checksums=params.rank_kv_checksums,
        )

    @property
    def where(self) -> str:
        return f"prefill engine {self.engine_id} at {self.host}:{self.port}"

    @property
    def held_request_id(self) -> str:
        """The prefill's request id (known once the load asked for the block ids, if it had to)."""
        return self.request_id or ""
