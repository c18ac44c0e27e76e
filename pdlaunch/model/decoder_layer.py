"""One decoder layer of the Llama family: `Attention` (qkv projection, q/k norms, rotary, the KV cache write, paged
attention, o projection), the SwiGLU `MLP` (or an MoE block, model/moe/), and `DecoderLayer`, the two with their
RMSNorms and the residual stream. model/llama.py stacks them into the model.
"""

from __future__ import annotations

import torch
from torch import nn

from pdlaunch.model.arch import ModelArch
from pdlaunch.model.attention import paged_attention
from pdlaunch.model.attention_plan import GroupPlan
from pdlaunch.model.fused_norm import rms_norm
from pdlaunch.model.fused_ops import fused_available, silu_and_mul, silu_and_mul_fp8
from pdlaunch.model.fused_rotary import rotary_write_kv
from pdlaunch.model.moe.block import Routed, SparseMoeBlock
from pdlaunch.model.parallel_linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pdlaunch.model.quant.fp8 import Fp8Rows
from pdlaunch.model.quant.kv_cache import kv_scale_parameter
from pdlaunch.model.rms_norm import RMSNorm
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
