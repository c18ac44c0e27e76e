"""A step's attention plan per KV-cache group (`GroupPlan`, `build_group_plan`): where each token's k/v is
written and which cached keys each query reads (layout: pdlaunch/model/attention_metadata.py).

The index arithmetic depends only on the step and the KV-cache group, so it is built once per group per step and
reused by every layer of the group (model/attention.py `paged_attention`). On CUDA the k/v writes go through one
fused kernel that skips slot -1 (no host sync), a decode's keys are read by the paged decode kernel
(triton_decode.py) from the block table, a step's prompt chunks beside decodes or over cached keys by the paged
prefill kernel (triton_prefill.py), and a `uniform_decode` step (CUDA graphs, runner/cuda_graphs.py) builds its
plan from device tensors only. Elsewhere the plan holds the gathered rows and masks of the torch path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pdlaunch.model.attention_metadata import AttentionMetadata
from pdlaunch.model.fused_ops import fused_available
from pdlaunch.model.triton_decode import paged_decode_available
from pdlaunch.model.triton_prefill import (
    PAGED_PREFILL_MAX_TOKENS,
    PrefillLaunch,
    paged_prefill_available,
    prefill_launch,
    prefill_tiles,
)


@dataclass
class PrefillSeq:
    q_start: int  # token range [q_start, q_end) in the flattened step
    q_end: int
    # Fresh prefill (no cached context): keys are the new k/v themselves, rows is None.
    rows: torch.Tensor | None  # [K] flat cache row of each key (layer 0, k), or None
    mask: torch.Tensor | None  # [Q, K] bool (sliding window), None = causal (aligned to the last key)


@dataclass
class GroupPlan:
    """Per KV-cache group, per step: where to write and what each query reads."""

    layers_in_group: int
    block_size: int
    write_tokens: torch.Tensor | None  # [Tw] tokens that have a slot; None = every token
    write_rows: torch.Tensor | None  # [Tw] flat row of (block, layer 0, k, offset); None with write_slots
    decode_tokens: torch.Tensor | None  # [Sd] token index of each decode sequence
    decode_rows: torch.Tensor | None  # [Sd, K] flat rows of the keys each decode query may see
    decode_mask: torch.Tensor | None  # [Sd, 1, 1, K] bool
    prefills: list[PrefillSeq] = field(default_factory=list)
    # CUDA paged decode kernel inputs (set instead of decode_rows/decode_mask when it is used).
    decode_block_table: torch.Tensor | None = None  # [Sd, max_blocks]
    decode_seq_lens: torch.Tensor | None = None  # [Sd]
    sliding_window: int | None = None
    # CUDA: the slot of every token (-1: not written), for the fused write; replaces write_rows.
    write_slots: torch.Tensor | None = None
    decode_only: bool = False  # every token is a decode_tokens row, in order (uniform decode)
    decode_leads: torch.Tensor | None = None  # [Sd] with prompt rows: each row's lead row (triton_decode.paged_decode)
    # CUDA paged prefill kernel inputs (set instead of `prefills` when it is used): the tiles of every prompt
    # chunk of the step and the step's block table (triton_prefill.paged_prefill).
    prefill_tiles: torch.Tensor | None = None  # [n, 4] int32
    prefill_block_table: torch.Tensor | None = None  # [S, max_blocks]
    prefill_launch: PrefillLaunch | None = None  # the tiles were cut for this launch's block_q

    def layer_offset(self, layer_in_group: int, kv: int) -> int:
        """Row offset of layer `layer_in_group`'s k (kv=0) or v (kv=1) from layer 0's k."""
        return (2 * layer_in_group + kv) * self.block_size


def _window_mask(kpos: torch.Tensor, qpos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[..., Q, K] bool: key visible to query (causal, within the window)."""
    mask = kpos.unsqueeze(-2) <= qpos.unsqueeze(-1)
    if window is not None:
        mask &= kpos.unsqueeze(-2) > qpos.unsqueeze(-1) - window
    return mask


def build_group_plan(attn: AttentionMetadata, group: int, kv_cache: torch.Tensor | None,
                     sliding_window: int | None) -> GroupPlan:
    """Index tensors for one KV-cache group. kv_cache None: no cache (only fresh prefills)."""
    device = attn.query_start_loc.device
    if kv_cache is not None and attn.uniform_decode and graph_safe(kv_cache):
        _, layers, _, block_size, _, _ = kv_cache.shape
        num_seqs = attn.seq_lens.shape[0]
        return GroupPlan(layers, block_size, write_tokens=None, write_rows=None,
                         decode_tokens=torch.arange(num_seqs, device=device), decode_rows=None, decode_mask=None,
                         decode_block_table=attn.block_tables[group], decode_seq_lens=attn.seq_lens,
                         sliding_window=sliding_window, write_slots=attn.slot_mapping[group], decode_only=True,
                         decode_leads=attn.row_leads)
    write_slots = None
    if kv_cache is None:
        layers, block_size = 0, 1
        write_tokens: torch.Tensor | None = torch.empty(0, dtype=torch.long, device=device)
        write_rows = torch.empty(0, dtype=torch.long, device=device)
    else:
        _, layers, _, block_size, _, _ = kv_cache.shape
        slots = attn.slot_mapping[group].long()
        if fused_available(kv_cache):  # the kernel finds the rows and skips slot -1 itself
            write_tokens, write_rows, write_slots = None, None, slots
        else:
            row_base = (slots // block_size) * (layers * 2 * block_size) + slots % block_size
            valid = slots >= 0
            if bool(valid.all()):
                write_tokens, write_rows = None, row_base
            else:
                write_tokens = valid.nonzero().squeeze(-1)
                write_rows = row_base[write_tokens]
    block_table = attn.block_tables[group].long() if kv_cache is not None else None
    plan = GroupPlan(layers, block_size, write_tokens, write_rows, None, None, None, sliding_window=sliding_window,
                     write_slots=write_slots)

    starts = [0]
    for qlen in attn.query_lens_cpu:
        starts.append(starts[-1] + qlen)
    launch = prefill_launch() if kv_cache is not None and paged_prefill_available(kv_cache) else None
    chunks = [(starts[i], q, n - q, i) for i, (q, n) in enumerate(zip(attn.query_lens_cpu, attn.seq_lens_cpu))
              if not (q == 1 and n > q)]
    # Steps of fresh prompts alone keep SDPA (no keys to gather, and their host work is not the decodes' wait).
    mixed = len(chunks) < len(attn.query_lens_cpu) or any(c[2] > 0 for c in chunks)
    if (launch is not None and block_table is not None and mixed
            and 0 < sum(c[1] for c in chunks) <= PAGED_PREFILL_MAX_TOKENS):
        # Every prompt chunk of the step in one launch a layer, its keys straight from the cache (written first).
        tiles = prefill_tiles([c[0] for c in chunks], [c[1] for c in chunks], [c[2] for c in chunks],
                              [c[3] for c in chunks], launch.block_q)
        plan.prefill_tiles = _on_device(tiles, device, torch.int32)
        plan.prefill_block_table = block_table
        plan.prefill_launch = launch
    decode_seqs: list[int] = []
    for i, (qlen, slen) in enumerate(zip(attn.query_lens_cpu, attn.seq_lens_cpu)):
        ctx = slen - qlen
        if qlen == 1 and ctx > 0:
            decode_seqs.append(i)
            continue
        if plan.prefill_tiles is not None:
            continue
        if ctx == 0:
            qpos = torch.arange(qlen, device=device)
            windowed = sliding_window is not None and qlen > sliding_window
            mask = _window_mask(qpos, qpos, sliding_window) if windowed else None
            plan.prefills.append(PrefillSeq(starts[i], starts[i] + qlen, None, mask))
            continue
        if block_table is None:
            raise ValueError("a sequence with cached context needs a KV cache")
        first_key = 0 if sliding_window is None else max(0, ctx - sliding_window + 1)
        kpos = torch.arange(first_key, slen, device=device)
        qpos = torch.arange(ctx, slen, device=device)
        blocks = block_table[i, kpos // block_size]
        rows = blocks * (layers * 2 * block_size) + kpos % block_size
        # Without a window the mask is causal aligned to the last key: torch's causal_lower_right, which SDPA
        # runs on its causal kernels (a boolean mask takes the masked kernel: a 2048-token chunk over 1k of
        # context 326 against 274 us on an H200, benchmarks/sdpa_lower_right.py).
        mask = _window_mask(kpos, qpos, sliding_window) if sliding_window is not None else None
        plan.prefills.append(PrefillSeq(starts[i], starts[i] + qlen, rows, mask))

    if decode_seqs:
        if block_table is None:
            raise ValueError("decode steps need a KV cache")
        max_len = max(attn.seq_lens_cpu[i] for i in decode_seqs)
        if sliding_window is None:
            num_blocks = -(-max_len // block_size)
        else:
            # A window of w keys touches at most ceil(w / block_size) + 1 blocks.
            num_blocks = min(-(-max_len // block_size), -(-sliding_window // block_size) + 1)
        # From pinned memory without blocking: torch.tensor(..., device=cuda) waits for the device to finish
        # everything queued (the step in flight under async scheduling) before the host may go on.
        seq_idx = _on_device(decode_seqs, device)
        plan.decode_tokens = _on_device([starts[i] for i in decode_seqs], device)
        if kv_cache is not None and paged_decode_available(kv_cache):
            plan.decode_block_table = block_table[seq_idx]
            plan.decode_seq_lens = attn.seq_lens[seq_idx].long()
            return plan
        qpos = attn.seq_lens[seq_idx].long() - 1  # [Sd]
        first_block = torch.zeros_like(qpos)
        if sliding_window is not None:
            first_block = (qpos - sliding_window + 1).clamp(min=0) // block_size
        block_idx = first_block.unsqueeze(1) + torch.arange(num_blocks, device=device)  # [Sd, nb]
        blocks = block_table[seq_idx].gather(1, block_idx.clamp(max=block_table.shape[1] - 1))
        offsets = torch.arange(block_size, device=device)
        kpos = (block_idx.unsqueeze(-1) * block_size + offsets).flatten(1)  # [Sd, K]
        rows = ((blocks * (layers * 2 * block_size)).unsqueeze(-1) + offsets).flatten(1)
        visible = kpos <= qpos.unsqueeze(1)  # [Sd, K]
        if sliding_window is not None:
            visible &= kpos > qpos.unsqueeze(1) - sliding_window
        # Masked keys still take part in the matmul (weight 0), and 0 * NaN = NaN: point them at
        # the query's own, just-written row so never-written cache memory is never read.
        own_block = block_table[seq_idx].gather(1, (qpos // block_size).unsqueeze(1))
        own_row = own_block * (layers * 2 * block_size) + (qpos % block_size).unsqueeze(1)
        plan.decode_rows = torch.where(visible, rows, own_row)
        plan.decode_mask = visible.view(len(decode_seqs), 1, 1, -1)
    return plan


def _on_device(values: list[int] | list[tuple[int, int, int, int]], device: torch.device,
               dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A tensor of `values` (long by default) on `device`; to CUDA from pinned memory, without blocking the host."""
    host = torch.tensor(values, dtype=dtype)
    return host.to(device) if device.type != "cuda" else host.pin_memory().to(device, non_blocking=True)


def graph_safe(kv_cache: torch.Tensor) -> bool:
    """True when a uniform-decode step over this cache runs without host syncs (CUDA graphs): the
    Triton paged decode kernel and the fused KV write both serve it."""
    return paged_decode_available(kv_cache) and fused_available(kv_cache)
