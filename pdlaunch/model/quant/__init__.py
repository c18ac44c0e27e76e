"""FP8 quantization: checkpoint formats (config.py), FP8 arithmetic (fp8.py), the linear method that
layers delegate to (linear.py), the Triton block-scaled GEMM (kernels.py) and the FP8 KV cache
(kv_cache.py)."""
