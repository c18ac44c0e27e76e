"""Mixture-of-Experts: config parsing (config.py), the stacked expert weights and their TP/EP sharding
(experts.py), the router and the MoE block of a decoder layer (block.py), checkpoint names (names.py),
and the fused expert computation (fused.py; triton_moe.py launching gemm_kernels.py and align_kernels.py; tile
configs under configs/)."""
