"""One step's inputs (runner/step_inputs.py) from the schedule and the block tables.

The engine builds them (TP rank 0 only) and hands them to the executor, which sends the same inputs to
every rank; the runner below never sees a request or a block table, only token rows and slots.

Async scheduling (engine/async_step.py): a request's newest token may still be on the device, sampled by
the step in flight (`Request.num_pending`). Its row gets a placeholder id here and the in-flight step's
sampled ids (`InFlight`: request id -> row of its ids tensor) fill it on the device.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from pdlaunch.engine.async_step import InFlight
from pdlaunch.engine.prompt_logprobs import prompt_rows
from pdlaunch.engine.scheduler_output import ScheduledRequest
from pdlaunch.errors import EngineError
from pdlaunch.kvcache.block_manager import BlockManager
from pdlaunch.runner.step_inputs import StepInputs


def build_step_inputs(scheduled: Sequence[ScheduledRequest], block_manager: BlockManager,
                      in_flight: InFlight | None = None) -> StepInputs:
    """The host-side inputs of the scheduled chunks (what every TP rank needs for the step)."""
    inputs = _build(scheduled, block_manager)
    if in_flight is not None:
        last_rows = list(itertools.accumulate((s.num_new_tokens for s in scheduled), initial=-1))[1:]
        for row, s in zip(last_rows, scheduled):
            if s.end > len(s.request.all_token_ids):  # its last input token is the one in flight
                inputs.pending_rows.append(row)
                inputs.pending_src.append(in_flight.row_of[s.request.request_id])
        inputs.pending_source = in_flight.token_ids if inputs.pending_rows else None
    return inputs


def _token_ids(s: ScheduledRequest) -> list[int]:
    """The chunk's input ids; 0 stands for a token still in flight (filled on the device)."""
    ids = s.request.all_token_ids[s.start:s.end]
    return ids + [0] * (s.num_new_tokens - len(ids))


def _build(scheduled: Sequence[ScheduledRequest], block_manager: BlockManager) -> StepInputs:
    block_size, num_groups = block_manager.block_size, block_manager.num_groups
    if all(s.num_new_tokens == 1 for s in scheduled):
        return _one_token_each(scheduled, block_manager)
    ids: list[int] = []
    pos_parts = []
    seq_index = []
    tables: list[list[list[int]]] = [[] for _ in range(num_groups)]
    for i, s in enumerate(scheduled):
        ids.extend(_token_ids(s))
        pos_parts.append(torch.arange(s.start, s.end, dtype=torch.long))
        seq_index.append(torch.full((s.num_new_tokens,), i, dtype=torch.long))
        for g, table in enumerate(block_manager.tables[s.request.request_id]):
            tables[g].append(table)
    positions = torch.cat(pos_parts)
    seq_of_token = torch.cat(seq_index)
    slot_mapping, block_tables = [], []
    for g in range(num_groups):
        width = max(len(t) for t in tables[g])
        bt = torch.tensor([t + [-1] * (width - len(t)) for t in tables[g]], dtype=torch.long)
        blocks = bt[seq_of_token, positions // block_size]  # [T]
        if bool((blocks < 0).any()):
            raise _no_block()
        slot_mapping.append(blocks * block_size + positions % block_size)
        block_tables.append(bt)
    query_lens = [s.num_new_tokens for s in scheduled]
    last = list(itertools.accumulate(query_lens, initial=-1))[1:]  # last token row of each request
    prompt = prompt_rows([(s.request, s.start, s.end) for s in scheduled])
    return StepInputs(
        input_ids=torch.tensor(ids, dtype=torch.long), positions=positions, query_lens=query_lens,
        context_lens=[s.start for s in scheduled], slot_mapping=slot_mapping, block_tables=block_tables,
        sample_rows=[t for t, s in zip(last, scheduled) if s.needs_sample],
        prompt_rows=prompt.rows, prompt_targets=prompt.targets, prompt_top_k=prompt.top_k,
    )


def _one_token_each(scheduled: Sequence[ScheduledRequest], block_manager: BlockManager) -> StepInputs:
    """build_step_inputs for a step of one token per request (decodes): plain Python lists and one
    tensor each, since a decode step's host time is time the GPU waits (the same values)."""
    bs, num_groups = block_manager.block_size, block_manager.num_groups
    positions = [s.start for s in scheduled]
    slots: list[list[int]] = [[] for _ in range(num_groups)]
    tables: list[list[list[int]]] = [[] for _ in range(num_groups)]
    for s, pos in zip(scheduled, positions):
        for g, table in enumerate(block_manager.tables[s.request.request_id]):
            block = table[pos // bs] if pos // bs < len(table) else -1
            if block < 0:
                raise _no_block()
            slots[g].append(block * bs + pos % bs)
            tables[g].append(table)
    n = len(scheduled)
    block_tables = []
    for g in range(num_groups):
        # Row by row into numpy: a third of the time of torch.tensor over padded nested lists
        # (64 x 256 blocks: 0.6 vs 1.9 ms on a slow host), which the GPU waits for.
        table_array = np.full((n, max(len(t) for t in tables[g])), -1, dtype=np.int64)
        for i, t in enumerate(tables[g]):
            table_array[i, :len(t)] = t
        block_tables.append(torch.from_numpy(table_array))
    prompt = prompt_rows([(s.request, s.start, s.end) for s in scheduled])
    return StepInputs(
        input_ids=torch.tensor([s.request.all_token_ids[s.start] if s.start < len(s.request.all_token_ids) else 0
                                for s in scheduled], dtype=torch.long),
        positions=torch.tensor(positions, dtype=torch.long), query_lens=[1] * n, context_lens=positions,
        slot_mapping=[torch.tensor(x, dtype=torch.long) for x in slots], block_tables=block_tables,
        sample_rows=[i for i, s in enumerate(scheduled) if s.needs_sample],
        prompt_rows=prompt.rows, prompt_targets=prompt.targets, prompt_top_k=prompt.top_k,
    )


def _no_block() -> EngineError:
    return EngineError("a scheduled token has no KV block", field="kv_cache",
                       hint="a pdlaunch bug; please report it with the log")
