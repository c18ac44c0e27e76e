"""TP fixtures: engines of a given TP size (rank 0 here, the other ranks spawned), a 1-KV-head model."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from pdlaunch.config.deployment_config import InstanceSpec
from pdlaunch.engine.llm import build_config
from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.model.demo_tokenizer import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    VOCAB_SIZE,
    generation_config,
    write_tokenizer_files,
)
from tests.kv_transfer.deployment_secret import secured

MakeTPEngine = Callable[..., LLMEngine]


@pytest.fixture
def make_tp_engine() -> Iterator[MakeTPEngine]:
    """make_tp_engine(path, tp, instance=None, device="cpu", expert_parallel=False, **overrides): a float32
    engine, shut down after."""
    engines: list[LLMEngine] = []

    def make(path: Path | str, tp: int, instance: InstanceSpec | None = None, device: str = "cpu",
             expert_parallel: bool = False, **overrides: Any) -> LLMEngine:
        overrides.setdefault("block_size", 8)
        overrides.setdefault("num_gpu_blocks", 128)
        config = secured(build_config(str(path), device, "float32", overrides))
        config.parallel.tp = tp
        config.parallel.enable_expert_parallel = expert_parallel
        engine = LLMEngine(config, instance)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown()


@pytest.fixture(scope="session")
def one_kv_head_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama with 4 query heads and a single KV head: at TP 2 the KV head is replicated."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    directory = tmp_path_factory.mktemp("llama_1kv")
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1,
                         num_hidden_layers=2, vocab_size=VOCAB_SIZE, max_position_embeddings=512, rms_norm_eps=1e-5,
                         bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, initializer_range=0.1)
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(directory)
    write_tokenizer_files(directory)
    (directory / "generation_config.json").write_text(json.dumps(generation_config()) + "\n")
    return directory
