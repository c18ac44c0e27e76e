"""StorageConnector on CPU: save on prefill, load on decode, prefix store across restarts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.config.engine_config import ModelConfig
from pdlaunch.config.kv_transfer_config import KVTransferConfig
from pdlaunch.kv_transfer.factory import create_connector
from pdlaunch.kv_transfer.params import RemoteDecodeRequest
from pdlaunch.kv_transfer.storage_connector import StorageConnector
from tests.kv_transfer.deployment_secret import secured
from tests.kv_transfer.pd_procs import make_spec

B = 4


def _connector(role: str, path: Path, **spec_kwargs) -> tuple[StorageConnector, object]:
    config = secured(DeploymentConfig(device="cpu", kv_transfer=KVTransferConfig(connector="storage",
                                                                           storage_path=str(path))))
    connector = create_connector(config, InstanceSpec(role=role, port=1, engine_id=f"{role}-engine"))
    assert isinstance(connector, StorageConnector)
    spec = make_spec(block_size=B, groups=2, **spec_kwargs)
    if role == "decode":
        for t in spec.kv_caches:
            t.zero_()
    connector.register_kv_caches(spec)
    return connector, spec


def _positions(spec, group: int, block_ids: list[int], start: int, end: int) -> torch.Tensor:
    """KV of positions [start, end) gathered from a block table: [num_layers, 2, end - start, heads, dim]."""
    cache = spec.kv_caches[group]
    parts = [cache[block_ids[p // B], :, :, p % B] for p in range(start, end)]
    return torch.stack(parts, dim=2) if parts else torch.empty(0)


def _save(prefill: StorageConnector, prompt: list[int], ids: list[list[int]]) -> dict:
    hold, params = prefill.request_finished("p", prompt, RemoteDecodeRequest(do_remote_decode=True), ids)
    assert hold is False and params.do_remote_prefill is True
    assert params.num_prompt_tokens == len(prompt)
    return params


@pytest.mark.parametrize("n", [1, B, B + 1, 3 * B - 1, 5 * B])
def test_round_trip_moves_exactly_the_prompt_positions(tmp_path: Path, n: int) -> None:
    prefill, p_spec = _connector("prefill", tmp_path, seed=1)
    decode, d_spec = _connector("decode", tmp_path, seed=2)
    prompt = list(range(50, 50 + n))
    blocks = -(-n // B)
    p_ids = [list(range(10, 10 + blocks)), list(range(3, 3 + blocks))[::-1]]
    d_ids = [list(range(1, 1 + blocks)), list(range(12, 12 + blocks))]
    params = _save(prefill, prompt, p_ids)
    ext = decode.get_num_new_matched_tokens("d", prompt, params, 0)
    assert ext == n - 1
    decode.start_load("d", prompt, params, d_ids, 0, ext)
    events = decode.get_finished()
    if ext:
        assert events.finished_recving == {"d"} and not events.failed_recving
    for g in range(2):
        assert torch.equal(_positions(d_spec, g, d_ids[g], 0, n - 1), _positions(p_spec, g, p_ids[g], 0, n - 1))
    if n > 1:  # the last prompt position is left for decode to recompute
        assert _positions(d_spec, 0, d_ids[0], n - 1, n).abs().sum() == 0


def test_prefix_store_across_restarts_and_local_hits(tmp_path: Path) -> None:
    prefill, p_spec = _connector("prefill", tmp_path, seed=1)
    prompt = list(range(7, 7 + 2 * B + 2))  # 2 full blocks + a 2-token tail
    p_ids = [[4, 5, 6], [7, 8, 9]]
    _save(prefill, prompt, p_ids)

    # A fresh decode (a restart) with a longer prompt that extends the stored one.
    decode, d_spec = _connector("decode", tmp_path, seed=2)
    longer = prompt + [999, 998, 997]
    assert decode.get_num_new_matched_tokens("a", longer, None, 0) == 2 * B + 2
    # A stored tail is reused whole only: diverging inside it leaves the full blocks.
    assert decode.get_num_new_matched_tokens("x", prompt[:2 * B + 1] + [5, 5, 5], None, 0) == 2 * B
    # With the first block cached locally, only the rest is loaded.
    assert decode.get_num_new_matched_tokens("b", longer, None, B) == B + 2
    d_ids = [[1, 2, 3, 13], [10, 11, 12, 14]]
    decode.start_load("b", longer, None, d_ids, B, B + 2)
    assert decode.get_finished().finished_recving == {"b"}
    assert d_spec.kv_caches[0][1].abs().sum() == 0  # locally cached block untouched
    assert torch.equal(_positions(d_spec, 0, d_ids[0], B, 2 * B + 2), _positions(p_spec, 0, p_ids[0], B, 2 * B + 2))
    # A prompt diverging inside the first block finds nothing.
    assert decode.get_num_new_matched_tokens("c", [1] + prompt[1:], None, 0) == 0


def test_sliding_window_group_loads_only_visible_blocks(tmp_path: Path) -> None:
    window = [None, 3]
    prefill, p_spec = _connector("prefill", tmp_path, seed=1, sliding_window=window)
    prompt = list(range(20, 20 + 3 * B))
    # The sliding group dropped its first block (left the window); the full group holds all three.
    p_ids = [[1, 2, 3], [-1, 5, 6]]
    params = _save(prefill, prompt, p_ids)
    decode, d_spec = _connector("decode", tmp_path, seed=2, sliding_window=window)
    ext = decode.get_num_new_matched_tokens("d", prompt, params, 0)
    assert ext == 3 * B - 1
    d_ids = [[7, 8, 9], [-1, 11, 12]]
    decode.start_load("d", prompt, params, d_ids, 0, ext)
    assert decode.get_finished().finished_recving == {"d"}
    # window 3 before position 11: positions 8..10 are needed, in block 2 only.
    assert torch.equal(_positions(d_spec, 1, d_ids[1], 8, 11), _positions(p_spec, 1, p_ids[1], 8, 11))
    assert d_spec.kv_caches[1][11].abs().sum() == 0


def test_incompatible_engine_does_not_see_the_files(tmp_path: Path) -> None:
    prefill, _ = _connector("prefill", tmp_path, seed=1)
    prompt = list(range(2 * B + 1))
    _save(prefill, prompt, [[1, 2, 3], [1, 2, 3]])
    other, _ = _connector("decode", tmp_path, seed=2, dtype=torch.bfloat16)
    assert other.get_num_new_matched_tokens("d", prompt, None, 0) == 0


def test_load_failure_is_reported_not_raised(tmp_path: Path) -> None:
    prefill, _ = _connector("prefill", tmp_path, seed=1)
    prompt = list(range(2 * B + 1))
    _save(prefill, prompt, [[1, 2, 3], [1, 2, 3]])
    decode, _ = _connector("decode", tmp_path, seed=2)
    assert decode.get_num_new_matched_tokens("d", prompt, None, 0) == 2 * B
    for f in tmp_path.rglob("*.safetensors"):
        f.write_bytes(b"garbage")
    decode.start_load("d", prompt, None, [[4, 5, 6], [4, 5, 6]], 0, 2 * B)
    events = decode.get_finished()
    assert "d" in events.failed_recving and "loading stored KV failed" in events.failed_recving["d"]


def test_a_decode_quantizing_at_load_finds_nothing_an_unquantized_prefill_stored(tmp_path: Path) -> None:
    """--quantization fp8 computes with other weights than the same checkpoint unquantized: two deployments
    sharing the directory (its default is one per user) must not share KV (test_storage_two_checkpoints_e2e.py)."""
    prefill, _ = _connector("prefill", tmp_path, seed=1)
    prompt = list(range(30, 30 + 2 * B + 1))
    params = _save(prefill, prompt, [[1, 2, 3], [4, 5, 6]])
    config = secured(DeploymentConfig(device="cpu", model=ModelConfig(quantization="fp8"), kv_transfer=KVTransferConfig(
        connector="storage", storage_path=str(tmp_path))))
    decode = create_connector(config, InstanceSpec(role="decode", port=1, engine_id="decode-fp8"))
    decode.register_kv_caches(make_spec(block_size=B, groups=2, seed=2))
    assert decode.get_num_new_matched_tokens("d", prompt, params, 0) == 0
    same, _ = _connector("decode", tmp_path, seed=2)
    assert same.get_num_new_matched_tokens("d", prompt, params, 0) == len(prompt) - 1
