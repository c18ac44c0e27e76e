"""FP8 quantization: checkpoint formats (config.py), FP8 arithmetic (fp8.py), the linear method that
layers delegate to (linear.py), the Triton kernels (activations.py: activation quantization; gemm.py: the
block-FP8 GEMM and its routing; block_gemv.py, split_gemm.py, cublas_gemm.py), FP8 MoE experts (experts.py)
and the FP8 KV cache (kv_cache.py)."""
