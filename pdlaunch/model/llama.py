"""One decoder for the Llama family (Llama 2/3.x, Qwen2, Qwen3, Mistral) and the MoE families built on
their attention (Qwen2/Qwen3-MoE, Mixtral, OLMoE: model/moe/), driven by `ModelArch`.

Differences between the families are configuration, not code: qkv bias (Qwen2), per-head q/k
RMSNorm (Qwen3), sliding window per layer (Mistral: all layers; Qwen2/Qwen3 hybrids: per
`layer_types`), llama3 rope scaling, tied embeddings. The layer math follows HF's modeling code operation for
operation so float32 output matches transformers.
"""

from __future__ import annotations

import torch
from torch import nn

from pdlaunch.model.arch import KVCacheGroup, ModelArch
from pdlaunch.model.attention import GroupPlan, build_group_plan, paged_attention
from pdlaunch.model.attention_metadata import AttentionMetadata
from pdlaunch.model.fused_norm import rms_norm
from pdlaunch.model.fused_ops import fused_available, silu_and_mul, silu_and_mul_fp8
from pdlaunch.model.fused_rotary import rotary_write_kv
from pdlaunch.model.layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RowParallelLinear,
    ShardId,
    VocabParallelEmbedding,
)
from pdlaunch.model.moe.block import Routed, SparseMoeBlock
from pdlaunch.model.pieces import PieceBuffers
from pdlaunch.model.quant.fp8 import Fp8Rows
from pdlaunch.model.quant.kv_cache import kv_scale_parameter
from pdlaunch.model.rotary import RotaryEmbedding
from pdlaunch.model.sharded_norm import ShardedRMSNorm
from pdlaunch.model.swiglu import swiglu_available, swiglu_gemm


class Attention(nn.Module):
    def __init__(self, arch: ModelArch, layer: int, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.head_dim = arch.head_dim
        self.num_heads = arch.num_heads // tp_size
        self.num_kv_heads = max(1, arch.num_kv_heads // tp_size)  # replicated when tp > KV heads
        self.scale = arch.head_dim**-0.5
        self.sliding_window = arch.layer_windows()[layer]
        self.kv_group, self.index_in_group = arch.layer_group_index()[layer]
        self.qkv_proj = QKVParallelLinear(arch.hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads,
                                          arch.attention_bias, tp_rank, tp_size)
        self.o_proj = RowParallelLinear(arch.num_heads * arch.head_dim, arch.hidden_size, arch.o_proj_bias,
                                        tp_rank, tp_size)
        self.rotary_emb = RotaryEmbedding(arch.head_dim, arch.rope_theta, arch.rope_scaling,
                                          arch.max_position_embeddings)
        # Qwen3: weights are [head_dim], shared by every head, so each TP rank holds them whole.
        # OLMoE (qk_norm_full_width): one norm over all q (all k) heads; each rank holds its heads' columns.
        self.q_norm: RMSNorm | ShardedRMSNorm | None = None
        self.k_norm: RMSNorm | ShardedRMSNorm | None = None
        self.full_width_qk_norm = arch.qk_norm_full_width
        if arch.qk_norm:
            self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)
            self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)
        elif arch.qk_norm_full_width:
            q_width, kv_width = self.num_heads * arch.head_dim, self.num_kv_heads * arch.head_dim
            self.q_norm = ShardedRMSNorm(arch.num_heads * arch.head_dim, q_width, tp_rank * q_width,
                                         arch.rms_norm_eps, tp_size)
            self.k_norm = ShardedRMSNorm(arch.num_kv_heads * arch.head_dim, kv_width,
                                         self.qkv_proj.kv_head_start * arch.head_dim, arch.rms_norm_eps,
                                         tp_size, replicas=max(1, tp_size // arch.num_kv_heads))
        # FP8 KV cache scales (model/quant/kv_cache.py): optional checkpoint tensors, 1.0 without them;
        # read into plain floats once loaded (kernels and CUDA graphs take them as constants).
        self.k_scale, self.v_scale = kv_scale_parameter(), kv_scale_parameter()
        self.kv_scales = (1.0, 1.0)

    def forward(self, cos_sin: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor | Fp8Rows,
                kv_cache: torch.Tensor | None, plan: GroupPlan) -> torch.Tensor:
        """cos_sin: the step's rotary tables [T, D] (RotaryEmbedding.cos_sin); x: [T, hidden]."""
        q, k, v, kv_written = self.project(cos_sin, x, kv_cache, plan.write_slots)
        # A decode step with a block-FP8 o projection: its input quantized in the attention kernel (a head of 128
        # is one quantization group)
        fp8 = self.o_proj.fp8_input(q.shape[0]) if plan.decode_only and self.head_dim == 128 else None
        return self.out_proj(self.attend(q, k, v, kv_cache, plan, kv_written, fp8=fp8))

    def project(self, cos_sin: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor | Fp8Rows,
                kv_cache: torch.Tensor | None,
                write_slots: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """Everything before attention: the qkv projection, q/k norms, rotary and, given `write_slots` (the
        slot of every token, -1: none), the k/v cache write. Returns q [T, Hq, D], k, v [T, Hkv, D] and whether
        the cache was written. No host sync on CUDA (piecewise CUDA graphs capture it: model/pieces.py)."""
        t = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        if self.full_width_qk_norm and self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # [T, heads * head_dim] each, before the head split
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        head_norm = None
        if not self.full_width_qk_norm and isinstance(self.q_norm, RMSNorm) and isinstance(self.k_norm, RMSNorm):
            # HF Qwen3 order: project, norm each head, then rotary.
            head_norm = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
        if kv_cache is not None and write_slots is not None:
            # Norm, rotary and the k/v cache write in one kernel on CUDA (the same ops in turn on CPU).
            q, k = rotary_write_kv(q, k, v, *cos_sin, kv_cache, write_slots, self.index_in_group,
                                   self.kv_scales, head_norm)
            return q, k, v, True
        if head_norm is not None:  # rows are heads: [T*H, D]
            q = rms_norm(q.reshape(-1, self.head_dim), head_norm[0], head_norm[2]).view_as(q)
            k = rms_norm(k.reshape(-1, self.head_dim), head_norm[1], head_norm[2]).view_as(k)
        q, k = self.rotary_emb.rotate(q, k, *cos_sin)
        return q, k, v, False

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor | None,
               plan: GroupPlan, kv_written: bool, out: torch.Tensor | None = None,
               fp8: bool | None = None) -> torch.Tensor | Fp8Rows:
        """Paged attention of `project`'s q, k, v -> [T, Hq, D] (into `out` when given; Fp8Rows as
        paged_attention's `fp8` says)."""
        return paged_attention(q, k, v, kv_cache, self.index_in_group, plan, self.scale, self.kv_scales,
                               kv_written, out, fp8)

    def out_proj(self, o: torch.Tensor | Fp8Rows) -> torch.Tensor:
        """o [T, Hq, D] (or [T, Hq * D] quantized for a block-FP8 o_proj) -> [T, hidden]."""
        if isinstance(o, Fp8Rows):
            quantized: torch.Tensor = self.o_proj(o)
            return quantized
        out: torch.Tensor = self.o_proj(o.reshape(o.shape[0], self.num_heads * self.head_dim))
        return out


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up in one matmul."""

    def __init__(self, arch: ModelArch, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        inter = arch.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            arch.hidden_size, [inter, inter], arch.mlp_bias, tp_rank, tp_size)
        self.down_proj = RowParallelLinear(inter, arch.hidden_size, arch.mlp_bias, tp_rank, tp_size)

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        gate_up_proj = self.gate_up_proj
        if (isinstance(x, torch.Tensor) and gate_up_proj.quant_method is None and gate_up_proj.bias is None
                and swiglu_available(x, gate_up_proj.weight)):
            # a decode batch on CUDA: the SwiGLU in the gate_up GEMM's epilogue (model/swiglu.py)
            down: torch.Tensor = self.down_proj(swiglu_gemm(x, gate_up_proj.weight))
            return down
        gate_up = gate_up_proj(x)
        if self.down_proj.takes_gate_up(gate_up):  # one row on CUDA: silu(gate) * up inside the down GEMV
            return self.down_proj.forward_silu_mul(gate_up)
        layout = self.down_proj.fp8_input(gate_up.shape[0]) if fused_available(gate_up) else None
        if layout is not None:  # block-FP8 down_proj: its input quantized in the SwiGLU's kernel
            quantized: torch.Tensor = self.down_proj(silu_and_mul_fp8(gate_up, layout))
            return quantized
        out: torch.Tensor = self.down_proj(silu_and_mul(gate_up))
        return out


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, layer: int, tp_rank: int, tp_size: int, expert_parallel: bool = False) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = Attention(arch, layer, tp_rank, tp_size)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp: MLP | SparseMoeBlock
        if arch.moe is not None and arch.moe.is_sparse(layer):
            self.mlp = SparseMoeBlock(arch.moe, arch.hidden_size, tp_rank, tp_size, expert_parallel)
        else:
            self.mlp = MLP(arch, tp_rank, tp_size)

    def forward(self, cos_sin: tuple[torch.Tensor, torch.Tensor], h: torch.Tensor, residual: torch.Tensor | None,
                kv_cache: torch.Tensor | None, plan: GroupPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """HF's `h = h + attn(norm(h)); h = h + mlp(norm(h))` with each skip-add fused into the next
        norm: takes and returns (output of the previous sublayer, residual stream before adding it);
        the first layer gets residual None. Same values, fewer kernels."""
        x, residual = self.attn_norm(h, residual)
        y, residual = self.mlp_norm(self.self_attn(cos_sin, x, kv_cache, plan), residual)
        return self.feed_forward(y), residual

    def attn_norm(self, h: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor | Fp8Rows, torch.Tensor]:
        """The input norm (after adding the residual, unless this is the first layer) as the qkv projection reads
        it, and the residual stream: RMSNorm.into."""
        return self.input_layernorm.into(self.self_attn.qkv_proj, h, residual)

    def mlp_norm(self, o: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor | Fp8Rows | Routed,
                                                                          torch.Tensor]:
        """The post-attention norm of the o projection's output plus the residual, as the MLP's gate_up projection
        reads it (an MoE block: with its routing where the router's product computes the norm too,
        SparseMoeBlock.norm_into), and the residual stream."""
        if isinstance(self.mlp, MLP):
            return self.post_attention_layernorm.into(self.mlp.gate_up_proj, o, residual)
        return self.mlp.norm_into(self.post_attention_layernorm, o, residual)

    def feed_forward(self, x: torch.Tensor | Fp8Rows | Routed) -> torch.Tensor:
        """The MLP's output [T, H], or an MoE layer's [T, k, H] weighted expert rows that sum to it: every consumer
        is the next RMSNorm with a residual (fused_ops.fused_add_rms_norm), which adds them in its kernel."""
        if isinstance(self.mlp, SparseMoeBlock):
            assert not isinstance(x, Fp8Rows)  # mlp_norm quantizes only an MLP's input
            moe: torch.Tensor = self.mlp(x, summed=False)
            return moe
        assert not isinstance(x, Routed)  # routed rows only come from an MoE block's norm_into
        out: torch.Tensor = self.mlp(x)
        return out


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
        """`expert_parallel`: MoE layers place whole experts per rank instead of splitting every expert."""
        super().__init__()
        self.arch = arch
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.kv_cache_groups: list[KVCacheGroup] = arch.kv_cache_groups()
        self.model = LlamaModel(arch, tp_rank, tp_size, expert_parallel)
        self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size, tp_rank, tp_size)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def finish_kv_scales(self) -> None:
        """Read every layer's loaded k/v scale into floats (after the checkpoint is loaded)."""
        for layer in self.model.decoder_layers:
            attn = layer.self_attn
            attn.kv_scales = (float(attn.k_scale), float(attn.v_scale))

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
        """The step's attention plan of every KV-cache group (model/attention.py)."""
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
