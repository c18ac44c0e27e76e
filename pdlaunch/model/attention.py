"""Paged attention over the block-major KV cache (layout: pdlaunch/model/attention_metadata.py).

Each step first writes the new k/v of every token into its slot, then every query attends to
its sequence's keys: fresh prefills directly over the new k/v (causal SDPA; on CUDA padded to a length bucket,
pdlaunch/model/fresh_attention.py),
prefills with cached context over keys gathered through the block table (on CUDA, a step of up to
512 prompt tokens beside decodes or over cached keys runs all its prompt chunks in one Triton launch
that reads the keys from the cache itself: pdlaunch/model/triton_prefill.py), and all decode
sequences (query_len == 1) together: one batched torch gather (CPU, reference), or the Triton
paged decode kernel on CUDA (pdlaunch/model/triton_decode.py; PDLAUNCH_PAGED_DECODE=torch forces
the gather path there). Sliding-window layers follow HF: a
query at position p sees keys at positions in (p - window, p].

Which of these serve a step, and their index tensors, are the KV-cache group's plan for the step
(model/attention_plan.py `build_group_plan`), built once and reused by every layer of the group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from pdlaunch.model.attention_plan import GroupPlan
from pdlaunch.model.fresh_attention import fresh_causal_attention
from pdlaunch.model.fused_ops import write_kv
from pdlaunch.model.quant import kv_cache as fp8_kv
from pdlaunch.model.quant.fp8 import Fp8Rows
from pdlaunch.model.triton_decode import paged_decode, paged_decode_fp8
from pdlaunch.model.triton_prefill import paged_prefill

if TYPE_CHECKING:
    from torch.nn.attention.bias import CausalBias


def causal_lower_right_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor | CausalBias:
    """The causal mask of `q_len` queries that are the last of `k_len` keys. CUDA: torch's causal_lower_right,
    which SDPA runs on its causal kernels; elsewhere the same mask as booleans (CPU SDPA materializes
    causal_lower_right to exactly these, so the outputs are equal bit for bit)."""
    if device.type == "cuda":
        # Imported here: torch.nn.attention.bias imports torch._dynamo (~2 s that a CPU instance's start need not
        # pay); on CUDA the runner's start-up warm-up imports it (its chunk over cached tokens longer than the
        # paged prefill kernel takes: runner/dry_steps.py), so no serving step does.
        from torch.nn.attention.bias import causal_lower_right

        return causal_lower_right(q_len, k_len)
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor | None,
                    layer_in_group: int, plan: GroupPlan, scale: float,
                    kv_scales: tuple[float, float] = (1.0, 1.0), kv_written: bool = False,
                    out: torch.Tensor | None = None, fp8: bool | None = None) -> torch.Tensor | Fp8Rows:
    """q: [T, Hq, D], k/v: [T, Hkv, D] (rotated) -> [T, Hq, D]; writes k/v into kv_cache unless
    `kv_written` (the caller wrote them to their slots: fused_ops.rotary_write_kv). `out`: where to write the
    result (a piecewise step's static buffer, model/pieces.py); not with a uniform-decode plan. `fp8` (head_dim
    128, a block-FP8 o projection's layout, quant/gemm.py fp8_input_layout): a uniform-decode plan's kernel
    returns its output [T, Hq * D] as Fp8Rows (triton_decode.paged_decode_fp8); other plans return the tensor.

    kv_scales: this layer's (k_scale, v_scale), applied when the cache is fp8 (model/quant/kv_cache.py).
    Every query sees keys and values as the cache holds them (fp8-rounded and rescaled when it is fp8)."""
    k_scale, v_scale = kv_scales
    flat = None
    if kv_cache is not None:
        if not kv_cache.is_contiguous():
            raise ValueError("the KV cache tensor must be contiguous (block-major layout)")
        flat = kv_cache.view(-1, kv_cache.shape[-2], kv_cache.shape[-1])  # [rows, Hkv, D]
    if kv_written:
        assert kv_cache is not None
    elif kv_cache is not None and plan.write_slots is not None:
        write_kv(kv_cache, k, v, plan.write_slots, layer_in_group, kv_scales)
    elif kv_cache is not None:
        assert flat is not None and plan.write_rows is not None
        k_rows = plan.write_rows + plan.layer_offset(layer_in_group, 0)
        v_rows = plan.write_rows + plan.layer_offset(layer_in_group, 1)
        new_k = k if plan.write_tokens is None else k[plan.write_tokens]
        new_v = v if plan.write_tokens is None else v[plan.write_tokens]
        fp8_kv.write_rows(flat, k_rows, new_k, k_scale)
        fp8_kv.write_rows(flat, v_rows, new_v, v_scale)

    if plan.decode_only:
        assert kv_cache is not None and plan.decode_tokens is not None and plan.decode_seq_lens is not None
        assert plan.decode_block_table is not None and out is None
        if fp8 is not None:
            return paged_decode_fp8(q, kv_cache, layer_in_group, plan.decode_tokens, plan.decode_block_table,
                                    plan.decode_seq_lens, plan.sliding_window, scale, fp8, kv_scales,
                                    plan.decode_leads)
        return paged_decode(q, kv_cache, layer_in_group, plan.decode_tokens, plan.decode_block_table,
                            plan.decode_seq_lens, plan.sliding_window, scale, kv_scales=kv_scales,
                            leads=plan.decode_leads)
    if out is None:
        out = torch.empty_like(q)
    if plan.prefill_tiles is not None:
        assert kv_cache is not None and plan.prefill_block_table is not None
        paged_prefill(q, kv_cache, layer_in_group, plan.prefill_tiles, plan.prefill_block_table, plan.sliding_window,
                      scale, out, kv_scales, plan.prefill_launch)
    for seq in plan.prefills:
        qs = q[seq.q_start:seq.q_end].transpose(0, 1).unsqueeze(0)  # [1, Hq, Q, D]
        if seq.rows is None:
            # A fresh prefill attends to its new k/v as the cache holds them (fp8-rounded when the cache
            # is fp8), so it sees what a decode or a PD peer continuing from the cache sees.
            cache_dtype = flat.dtype if flat is not None else q.dtype
            ks = fp8_kv.round_trip(k[seq.q_start:seq.q_end], k_scale, cache_dtype)
            vs = fp8_kv.round_trip(v[seq.q_start:seq.q_end], v_scale, cache_dtype)
        else:
            assert flat is not None
            ks = fp8_kv.load(fp8_kv.read_rows(flat, seq.rows + plan.layer_offset(layer_in_group, 0)), k_scale, q.dtype)
            vs = fp8_kv.load(fp8_kv.read_rows(flat, seq.rows + plan.layer_offset(layer_in_group, 1)), v_scale, q.dtype)
        ks = ks.transpose(0, 1).unsqueeze(0)  # [1, Hkv, K, D]
        vs = vs.transpose(0, 1).unsqueeze(0)
        mask: torch.Tensor | CausalBias | None = seq.mask
        if mask is None and seq.rows is not None:  # cached context: the chunk's queries are the last keys
            mask = causal_lower_right_mask(qs.shape[2], ks.shape[2], qs.device)
        if mask is None and seq.rows is None:  # a fresh prompt: at its bucket's length on CUDA (fresh_attention.py)
            o = fresh_causal_attention(qs, ks, vs, scale)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
        out[seq.q_start:seq.q_end] = o[0].transpose(0, 1)

    if plan.decode_block_table is not None:
        assert kv_cache is not None and plan.decode_tokens is not None and plan.decode_seq_lens is not None
        out[plan.decode_tokens] = paged_decode(q, kv_cache, layer_in_group, plan.decode_tokens,
                                               plan.decode_block_table, plan.decode_seq_lens,
                                               plan.sliding_window, scale, kv_scales=kv_scales)
    elif plan.decode_tokens is not None:
        assert flat is not None and plan.decode_rows is not None
        qd = q[plan.decode_tokens].unsqueeze(2)  # [Sd, Hq, 1, D]
        kd = fp8_kv.load(fp8_kv.read_rows(flat, plan.decode_rows + plan.layer_offset(layer_in_group, 0)), k_scale,
                          q.dtype)
        vd = fp8_kv.load(fp8_kv.read_rows(flat, plan.decode_rows + plan.layer_offset(layer_in_group, 1)), v_scale,
                          q.dtype)
        kd, vd = kd.transpose(1, 2), vd.transpose(1, 2)
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=plan.decode_mask, scale=scale, enable_gqa=True)
        out[plan.decode_tokens] = o.squeeze(2)
    return out
