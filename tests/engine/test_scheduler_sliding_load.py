"""A connector load into a model with a sliding-window KV-cache group, without a model.

The load fills a sliding-window group only from (end of the load - window) on, so the blocks before
that hold no KV here: they must stay unallocated (-1), never registered as the prompt's prefix. Else a
later prompt sharing that prefix gets a prefix hit whose window reads never-written KV (PD gave wrong
greedy tokens for a Qwen3 hybrid while the colocated engine was right).
"""

from __future__ import annotations

from pdlaunch.engine.scheduler import Scheduler
from pdlaunch.kvcache.block_manager import BlockManager
from tests.engine.test_scheduler import BS, FakeConnector, drain, req, step

WINDOW = 4


def test_load_leaves_blocks_before_the_window_unallocated_and_uncached() -> None:
    conn = FakeConnector()
    s = Scheduler(BlockManager(32, BS, sliding_windows=(None, WINDOW)), max_num_seqs=4,
                  max_num_batched_tokens=64, connector=conn)
    s.add_request(req("loaded", 17, max_tokens=1, params={"do_remote_prefill": True}, base=5))
    step(s)
    (_, tables, local, ext), = conn.loads
    assert (local, ext) == (0, 16)
    assert all(b >= 0 for b in tables[0]) and len(tables[0]) == 5
    # Positions 12..15 are the last WINDOW the recomputed token 16 sees: block 3 and later.
    assert tables[1][:3] == [-1, -1, -1] and all(b >= 0 for b in tables[1][3:])
    conn.events.finished_recving.add("loaded")
    s.handle_connector_events(conn.get_finished())
    drain(s)

    # Shares the first 3 blocks: the full-attention group caches them, the sliding group never held
    # block 2 (positions 8..11), which a query at 12 reads, so there is no prefix hit.
    local_prompt = req("local", 15, max_tokens=1, base=5)
    s.add_request(local_prompt)
    out = step(s)
    assert [(x.start, x.num_new_tokens) for x in out.scheduled] == [(0, 15)]
    assert local_prompt.num_cached_tokens == 0
    drain(s)
    assert s.block_manager.num_used_blocks() == 0
