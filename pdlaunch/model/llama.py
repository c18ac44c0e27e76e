"""One decoder for the Llama family (Llama 2/3.x, Qwen2, Qwen3, Mistral) and the MoE families built on
their attention (Qwen2/Qwen3-MoE, Mixtral, OLMoE: model/moe/), driven by `ModelArch`.

Differences between the families are configuration, not code: qkv bias (Qwen2), per-head q/k
RMSNorm (Qwen3), sliding window per layer (Mistral: all layers; Qwen2/Qwen3 hybrids: per
`layer_types`), llama3 rope scaling, tied embeddings. The layer math (model/decoder_layer.py) follows HF's modeling
code operation for operation so float32 output matches transformers.
"""

from __future__ import annotations

import torch
from torch import nn

from pdlaunch.model.arch import KVCacheGroup, ModelArch
from pdlaunch.model.attention_metadata import AttentionMetadata
from pdlaunch.model.attention_plan import GroupPlan, build_group_plan
from pdlaunch.model.decoder_layer import DecoderLayer
from pdlaunch.model.pieces import PieceBuffers
from pdlaunch.model.rms_norm import RMSNorm
from pdlaunch.model.vocab_parallel import ParallelLMHead, VocabParallelEmbedding
from pdlaunch.model.weight_loader import ShardId


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArch, tp_rank: int, tp_size: int, expert_parallel: bool = False) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, tp_rank, tp_size)
        self.layers = nn.ModuleList(DecoderLayer(arch, i, tp_rank, tp_size, expert_parallel)
                                    for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    @property
    def decoder_layers(self) -> list[DecoderLayer]:
        """`layers` as what they are (nn.ModuleList yields plain Modules)."""
        return [layer for layer in self.layers if isinstance(layer, DecoderLayer)]

    def layer(self, index: int) -> DecoderLayer:
        """Layer `index` without building `decoder_layers` (once per layer of a step on the piecewise path)."""
        layer = self.layers[index]
        assert isinstance(layer, DecoderLayer)
        return layer


class CausalLM(nn.Module):
    """Llama-family causal LM over a paged KV cache. Parameter names follow HF checkpoints, with
    q/k/v merged into `qkv_proj` and gate/up into `gate_up_proj` (see `PACKED_MODULES`)."""

    # checkpoint module name -> (our module name, shard id for its weight_loader)
    PACKED_MODULES: dict[str, tuple[str, ShardId]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, arch: ModelArch, tp_rank: int = 0, tp_size: int = 1, expert_parallel: bool = False) -> None:
        """`expert_parallel`: MoE layers place whole experts per rank instead of splitting every expert. The TP size
        is checked before (loader.meta_model, the one builder: model/tp_split.py's rules and the checkpoint's)."""
        super().__init__()
        self.arch = arch
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.kv_cache_groups: list[KVCacheGroup] = arch.kv_cache_groups()
        self.unscaled_kv_layers: list[int] = []  # layers whose k/v scales the checkpoint lacks (finish_kv_scales)
        self.model = LlamaModel(arch, tp_rank, tp_size, expert_parallel)
        self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size, tp_rank, tp_size)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def finish_kv_scales(self, loaded: set[str]) -> None:
        """Read every layer's k/v scale into floats (after the checkpoint is loaded; `loaded`: the names of the
        parameters it filled), and note the layers it gave none (`unscaled_kv_layers`: their scales stay 1.0)."""
        self.unscaled_kv_layers = []
        for i, layer in enumerate(self.model.decoder_layers):
            attn = layer.self_attn
            attn.kv_scales = (float(attn.k_scale), float(attn.v_scale))
            if not {f"model.layers.{i}.self_attn.k_scale", f"model.layers.{i}.self_attn.v_scale"} <= loaded:
                self.unscaled_kv_layers.append(i)

    def kv_scales(self) -> list[tuple[float, float]]:
        """Per layer (k_scale, v_scale) that the FP8 KV cache applies."""
        return [layer.self_attn.kv_scales for layer in self.model.decoder_layers]

    def layer_kv_group(self, layer: int) -> tuple[int, int]:
        """(KV cache group index, index of the layer inside its group) for `layer`."""
        attn = self.model.decoder_layers[layer].self_attn
        return attn.kv_group, attn.index_in_group

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden].

        kv_caches[g]: [num_blocks, layers_in_group, 2, block_size, num_kv_heads, head_dim] per
        KV-cache group; an empty list runs without a cache (fresh prefills only, e.g. profiling).
        """
        caches: list[torch.Tensor | None] = list(kv_caches) if kv_caches else [None] * len(self.kv_cache_groups)
        plans = self.group_plans(attn, kv_caches)
        h = self.model.embed_tokens(input_ids)
        residual = None
        # Every layer has the same rotary parameters (ModelArch has one rope config).
        layers = self.model.decoder_layers
        cos_sin = layers[0].self_attn.rotary_emb.cos_sin(positions, h.dtype)
        for layer in layers:
            g = layer.self_attn.kv_group
            h, residual = layer(cos_sin, h, residual, caches[g], plans[g])
        out: torch.Tensor = self.model.norm(h, residual)[0]
        return out

    def group_plans(self, attn: AttentionMetadata, kv_caches: list[torch.Tensor]) -> list[GroupPlan]:
        """The step's attention plan of every KV-cache group (model/attention_plan.py)."""
        caches: list[torch.Tensor | None] = list(kv_caches) if kv_caches else [None] * len(self.kv_cache_groups)
        if len(caches) != len(self.kv_cache_groups):
            raise ValueError(f"model has {len(self.kv_cache_groups)} KV cache groups, got {len(caches)} caches")
        return [build_group_plan(attn, g, caches[g], group.sliding_window)
                for g, group in enumerate(self.kv_cache_groups)]

    # -- piecewise steps (model/pieces.py) ---------------------------------------------------------
    @property
    def num_pieces(self) -> int:
        """Pieces of a piecewise step: one ending at each layer's attention, and the last."""
        return len(self.model.layers) + 1

    def piece_buffers(self, inputs: torch.Tensor) -> PieceBuffers:
        """Static buffers for `forward_piece` / `attend_piece` around `inputs` [2 + groups, N] long (ids,
        positions, each group's slots)."""
        attn = self.model.layer(0).self_attn
        return PieceBuffers.allocate(inputs, attn.num_heads, attn.num_kv_heads, attn.head_dim, self.arch.hidden_size,
                                     self.model.embed_tokens.weight.dtype)

    def forward_piece(self, index: int, bufs: PieceBuffers, tokens: int, kv_caches: list[torch.Tensor]) -> None:
        """Piece `index` over the first `tokens` rows of `bufs`: reads only device tensors of fixed shape (the
        buffers, the weights, the cache), so a CUDA graph captures it once per token count."""
        layers = self.model.decoder_layers
        if index == 0:
            h = self.model.embed_tokens(bufs.input_ids[:tokens])
            cos, sin = layers[0].self_attn.rotary_emb.cos_sin(bufs.positions[:tokens], h.dtype)
            bufs.cos[:tokens].copy_(cos)
            bufs.sin[:tokens].copy_(sin)
            x, residual = layers[0].attn_norm(h, None)
        else:
            done = layers[index - 1]
            o = done.self_attn.out_proj(bufs.attn_out[:tokens])
            y, residual = done.mlp_norm(o, bufs.residual[:tokens])
            h = done.feed_forward(y)
            if index == len(layers):
                bufs.hidden[:tokens].copy_(self.model.norm(h, residual)[0])
                return
            x, residual = layers[index].attn_norm(h, residual)
        bufs.residual[:tokens].copy_(residual)
        attn = layers[index].self_attn
        q, k, v, written = attn.project((bufs.cos[:tokens], bufs.sin[:tokens]), x, kv_caches[attn.kv_group],
                                        bufs.slots[attn.kv_group][:tokens])
        assert written  # project writes k/v whenever it gets a cache and slots
        bufs.q[:tokens].copy_(q)
        bufs.k[:tokens].copy_(k)
        bufs.v[:tokens].copy_(v)

    def attend_piece(self, index: int, bufs: PieceBuffers, tokens: int, kv_caches: list[torch.Tensor],
                     plans: list[GroupPlan]) -> None:
        """Layer `index`'s attention between pieces `index` and `index + 1`, eagerly, over the step's real
        `tokens` rows (`plans` from `group_plans` of the step's metadata); the output goes to `bufs.attn_out`."""
        attn = self.model.layer(index).self_attn
        g = attn.kv_group
        attn.attend(bufs.q[:tokens], bufs.k[:tokens], bufs.v[:tokens], kv_caches[g], plans[g], kv_written=True,
                    out=bufs.attn_out[:tokens])

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] float32."""
        logits: torch.Tensor = self.lm_head(hidden)
        return logits
