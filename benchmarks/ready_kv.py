"""A benchmark-only KV connector: every prompt's KV is "already loaded", so requests start decoding.

Decode speed at 48 x 3072 needs 147k prompt tokens in the cache; prefilling them costs far more
time than the decode steps measured on them. This connector answers every request as a PD decode
instance answers one whose prefill ran elsewhere: the whole prompt but its last token comes from
the connector (nothing is copied: the blocks keep whatever the cache holds, e.g. random values
written once), and the engine's first step for the request is already a one-token decode. Step
times then are `engine.step()` of real decode batches (scheduler, graph replay, sampler,
detokenizer), at any batch x context, without a prefill.
"""

from __future__ import annotations

from typing import Any

from pdlaunch.kv_transfer.base import KVCacheSpec, KVConnector, KVConnectorEvents


class ReadyKVConnector(KVConnector):
    def __init__(self) -> None:
        self.loading: set[str] = set()

    def register_kv_caches(self, spec: KVCacheSpec) -> None:
        self.spec = spec

    def get_num_new_matched_tokens(self, request_id: str, prompt_token_ids: list[int],
                                   kv_transfer_params: dict[str, Any] | None, num_local_computed_tokens: int) -> int:
        return len(prompt_token_ids) - 1 - num_local_computed_tokens

    def start_load(self, request_id: str, prompt_token_ids: list[int], kv_transfer_params: dict[str, Any] | None,
                   block_ids: list[list[int]], num_local_computed_tokens: int, num_external_tokens: int) -> None:
        self.loading.add(request_id)

    def request_finished(self, request_id: str, prompt_token_ids: list[int],
                         kv_transfer_params: dict[str, Any] | None,
                         block_ids: list[list[int]]) -> tuple[bool, dict[str, Any] | None]:
        return False, None

    def get_finished(self) -> KVConnectorEvents:
        done, self.loading = self.loading, set()
        return KVConnectorEvents(finished_recving=done)
