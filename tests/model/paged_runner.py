"""A minimal paged-KV driver for model tests: allocates blocks, builds AttentionMetadata, steps.

Blocks are handed out in a scrambled order (so block ids are not positions), sliding-window
groups release blocks that left the window (table entry -1), and released blocks are filled
with NaN: reading one, even under a mask, would poison the output and fail the test.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pdlaunch.model.attention_metadata import AttentionMetadata
from pdlaunch.model.llama import CausalLM


@dataclass
class _Seq:
    tokens: list[int] = field(default_factory=list)  # tokens whose KV is in the cache
    blocks: list[list[int]] = field(default_factory=list)  # per group; -1 = released


class PagedRunner:
    def __init__(self, model: CausalLM, block_size: int = 4, num_blocks: int = 96) -> None:
        self.model = model
        self.block_size = block_size
        param = next(model.parameters())
        arch = model.arch
        self.kv_caches = [
            torch.zeros(num_blocks, len(g.layers), 2, block_size, arch.num_kv_heads, arch.head_dim,
                        dtype=param.dtype, device=param.device)
            for g in model.kv_cache_groups
        ]
        # Scrambled but deterministic allocation order.
        order = sorted(range(num_blocks), key=lambda b: (b * 37) % num_blocks)
        self.free = [list(order) for _ in model.kv_cache_groups]
        self.seqs: dict[str, _Seq] = {}

    def _block_for(self, seq: _Seq, g: int, pos: int) -> int:
        while len(seq.blocks[g]) <= pos // self.block_size:
            seq.blocks[g].append(self.free[g].pop(0))
        return seq.blocks[g][pos // self.block_size]

    def _release_outside_window(self, seq: _Seq) -> None:
        next_pos = len(seq.tokens)
        for g, group in enumerate(self.model.kv_cache_groups):
            if group.sliding_window is None:
                continue
            first_needed = max(0, next_pos - group.sliding_window + 1)
            for i in range(first_needed // self.block_size):
                if seq.blocks[g][i] >= 0:
                    self.kv_caches[g][seq.blocks[g][i]].fill_(float("nan"))
                    self.free[g].append(seq.blocks[g][i])
                    seq.blocks[g][i] = -1

    def step(self, chunks: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        """Run one step with `chunks[seq_id]` new tokens per sequence -> logits [n, vocab] each."""
        device = self.kv_caches[0].device
        groups = self.model.kv_cache_groups
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[list[int]] = [[] for _ in groups]
        query_lens, seq_lens = [], []
        for seq_id, new in chunks.items():
            seq = self.seqs.setdefault(seq_id, _Seq(blocks=[[] for _ in groups]))
            start = len(seq.tokens)
            for j, tok in enumerate(new):
                input_ids.append(tok)
                positions.append(start + j)
                for g in range(len(groups)):
                    block = self._block_for(seq, g, start + j)
                    slots[g].append(block * self.block_size + (start + j) % self.block_size)
            query_lens.append(len(new))
            seq_lens.append(start + len(new))
        max_blocks = max(len(self.seqs[s].blocks[0]) for s in chunks)
        tables = []
        for g in range(len(groups)):
            rows = [[max(b, 0) for b in self.seqs[s].blocks[g]] for s in chunks]
            tables.append(torch.tensor([r + [0] * (max_blocks - len(r)) for r in rows], device=device))
        qsl = [0]
        for n in query_lens:
            qsl.append(qsl[-1] + n)
        attn = AttentionMetadata(
            query_start_loc=torch.tensor(qsl, device=device),
            seq_lens=torch.tensor(seq_lens, device=device),
            context_lens=torch.tensor([s - q for s, q in zip(seq_lens, query_lens)], device=device),
            slot_mapping=[torch.tensor(s, device=device) for s in slots],
            block_tables=tables,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
        )
        with torch.no_grad():
            hidden = self.model(torch.tensor(input_ids, device=device), torch.tensor(positions, device=device),
                                attn, self.kv_caches)
            logits = self.model.compute_logits(hidden).cpu()
        out = {}
        for i, (seq_id, new) in enumerate(chunks.items()):
            self.seqs[seq_id].tokens.extend(new)
            self._release_outside_window(self.seqs[seq_id])
            out[seq_id] = logits[qsl[i]:qsl[i + 1]]
        return out

    def greedy(self, prompt: list[int], max_new_tokens: int, seq_id: str = "s", chunk: int | None = None) -> list[int]:
        """Prefill (optionally in chunks of `chunk` tokens), then 1-token decode steps."""
        chunk = chunk or len(prompt)
        logits = None
        for i in range(0, len(prompt), chunk):
            logits = self.step({seq_id: prompt[i:i + chunk]})[seq_id]
        out: list[int] = []
        while True:
            assert logits is not None
            out.append(int(logits[-1].argmax()))
            if len(out) == max_new_tokens:
                return out
            logits = self.step({seq_id: [out[-1]]})[seq_id]
