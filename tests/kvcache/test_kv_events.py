import pytest
from pydantic import ValidationError

from pdlaunch.kvcache.events import KV_EVENT, KvSnapshot, KvStored, hash_hex, matched_blocks, prompt_block_hashes
from pdlaunch.kvcache.prefix_cache import PrefixIndex, hash_block


def test_prompt_hashes_match_the_prefix_index_chain() -> None:
    tokens = list(range(100, 140))
    index = PrefixIndex()
    parent = None
    for start in range(0, 32, 16):
        parent = index.get_or_add(parent, tuple(tokens[start : start + 16]))
    chain = [node.block_hash for node in index.find_chain(tokens, 16, 2)]
    assert prompt_block_hashes(tokens, 16) == [hash_hex(h) for h in chain]  # 40 tokens: two full blocks


def test_matched_blocks_stops_at_the_first_miss() -> None:
    hashes = prompt_block_hashes(list(range(64)), 16)
    assert matched_blocks(hashes, set(hashes[:2])) == 2
    assert matched_blocks(hashes, {hashes[0], hashes[2]}) == 1
    assert matched_blocks(hashes, set(hashes)) == 4
    assert matched_blocks([], set()) == 0


def test_events_parse_by_type_and_refuse_bad_hashes() -> None:
    first = hash_hex(hash_block(None, (1, 2)))
    event = KV_EVENT.validate_json(f'{{"type": "stored", "seq": 3, "hashes": ["{first}"]}}')
    assert isinstance(event, KvStored) and event.hashes == [first]
    snap = KV_EVENT.validate_python({"type": "snapshot", "seq": 0, "engine_id": "e", "block_size": 16, "hashes": []})
    assert isinstance(snap, KvSnapshot)
    for bad in ({"type": "stored", "seq": 1, "hashes": ["xyz"]}, {"type": "moved", "seq": 1, "hashes": []}):
        with pytest.raises(ValidationError):
            KV_EVENT.validate_python(bad)


@pytest.mark.parametrize("block_size", [1, 8, 16, 128])
def test_prompt_hashes_are_hash_block_chained_for_any_ids(block_size: int) -> None:
    """prompt_block_hashes packs the ids once: the hashes stay hash_block's, chained, for ids up to int64's bound."""
    tokens = [0, 1, 255, 256, 65_535, 2**31, 2**63 - 1, 128_000] * 40 + [7] * (block_size - 1)  # a partial block
    parent, expected = None, []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash_block(parent, tuple(tokens[start : start + block_size]))
        expected.append(hash_hex(parent))
    assert prompt_block_hashes(tokens, block_size) == expected
    assert prompt_block_hashes(tokens[: block_size - 1], block_size) == []
