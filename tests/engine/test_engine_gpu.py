"""CUDA: parity with transformers (float32 ids, bfloat16 logprobs), batching, memory profiling.
Run by `make test-gpu`."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.model.demo_tokenizer import EOS_TOKEN_ID
from tests.engine.conftest import MakeEngine, run_all
from tests.helpers.checkpoints import hf_greedy, hf_logits

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(autouse=True)
def _no_tf32() -> None:
    """float32 parity needs true float32 matmuls on both sides."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 500) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("fixture", ["llama_ckpt", "qwen2_ckpt", "mistral_ckpt", "hybrid_ckpt", "sharded_ckpt"])
def test_cuda_float32_greedy_matches_transformers(fixture: str, request: pytest.FixtureRequest,
                                                  make_engine: MakeEngine) -> None:
    path = request.getfixturevalue(fixture)
    batch = prompts([5, 19, 33, 64])
    engine = make_engine(path, device="cuda", max_num_batched_tokens=32)
    assert engine.device.type == "cuda" and engine.runner.kv_caches[0].is_cuda
    for prompt, out in zip(batch, run_all(engine, batch, GREEDY)):
        reference = hf_greedy(path, prompt, GREEDY.max_tokens, device="cuda")
        assert len(reference) == GREEDY.max_tokens or reference[-1] == EOS_TOKEN_ID
        assert out.output_token_ids[:len(reference)] == reference


def test_cuda_batched_preempted_and_cached_equal_one_at_a_time(llama_ckpt, make_engine: MakeEngine) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(5)
    batch = [[rng.randrange(500) for _ in range(rng.randint(1, 60))] for _ in range(32)]
    single = make_engine(llama_ckpt, device="cuda", max_num_seqs=1, enable_prefix_caching=False)
    reference = [run_all(single, [p], GREEDY)[0].output_token_ids for p in batch]
    tiny = make_engine(llama_ckpt, device="cuda", num_gpu_blocks=12, max_num_batched_tokens=48)
    assert [o.output_token_ids for o in run_all(tiny, batch, GREEDY)] == reference
    assert tiny.stats()["num_preemptions"] > 0
    cached = make_engine(llama_ckpt, device="cuda")
    for _ in range(2):
        assert [o.output_token_ids for o in run_all(cached, batch, GREEDY)] == reference
    assert cached.stats()["prompt_tokens_cached"] > 0


@pytest.mark.parametrize("fixture", ["llama_ckpt", "qwen2_ckpt", "hybrid_ckpt"])
def test_cuda_bfloat16_logprobs_agree_with_transformers(fixture: str, request: pytest.FixtureRequest,
                                                        make_engine: MakeEngine) -> None:
    path = request.getfixturevalue(fixture)
    batch = prompts([7, 24, 50], seed=2)
    engine = make_engine(path, device="cuda", dtype="bfloat16")
    assert engine.runner.kv_caches[0].dtype == torch.bfloat16
    outs = []
    for prompt in batch:
        engine.add_request(f"bf-{len(outs)}", prompt, SamplingParams(max_tokens=1, temperature=0.0, logprobs=5))
        while engine.has_unfinished_requests():
            outs.extend(o for o in engine.step() if o.finished)
    for prompt, out in zip(batch, outs):
        ref = hf_logits(path, prompt, dtype=torch.bfloat16, device="cuda")[-1].log_softmax(-1)
        (lp,) = out.new_logprobs or []
        for token_id, value in lp.top.items():
            # bf16 has 8 bits of mantissa: logits of magnitude ~10 carry errors of a few 0.01.
            assert abs(value - ref[token_id].item()) < 0.1, (token_id, value, ref[token_id].item())
        margin = ref.topk(2).values
        if margin[0] - margin[1] > 0.2:
            assert lp.token_id == int(ref.argmax())


@pytest.mark.gpu_serial  # sizes its KV cache by a share of the GPU's memory, which workers beside it would hold
def test_cuda_memory_profile_sizes_the_kv_cache(llama_ckpt, make_engine: MakeEngine) -> None:  # type: ignore[no-untyped-def]
    free, total = torch.cuda.mem_get_info()
    engine = make_engine(llama_ckpt, device="cuda", num_gpu_blocks=None, gpu_memory_utilization=0.2)
    kv_bytes = engine.runner.num_blocks * engine.runner.block_bytes
    assert 0.1 * total < kv_bytes < 0.2 * total
    assert torch.cuda.memory_allocated() < 0.2 * total + 2**28
    assert run_all(engine, prompts([10]), GREEDY)[0].finish_reason == "length"


def test_cuda_sleep_with_cumem_keeps_addresses_and_outputs(llama_ckpt, make_engine: MakeEngine) -> None:  # type: ignore[no-untyped-def]
    from pdlaunch.memory.platform import is_cumem_allocator_available

    if not is_cumem_allocator_available():
        pytest.skip("the cumem allocator is not available on this host")
    engine = make_engine(llama_ckpt, device="cuda", enable_sleep_mode=True, enable_cumem_allocator=True)
    batch = prompts([9, 30], seed=4)
    before = [o.output_token_ids for o in run_all(engine, batch, GREEDY)]
    kv_ptr = engine.runner.kv_caches[0].data_ptr()
    weight_ptr = next(engine.runner.model.parameters()).data_ptr()
    for level in (1, 2):
        assert engine.sleep(level).freed_bytes > 0 and engine.is_sleeping()
        engine.wake_up()
        assert engine.runner.kv_caches[0].data_ptr() == kv_ptr
        assert next(engine.runner.model.parameters()).data_ptr() == weight_ptr
        assert [o.output_token_ids for o in run_all(engine, batch, GREEDY)] == before


def _with_positions(path: Path, tmp_path: Path, positions: int) -> Path:
    """A copy of a tiny checkpoint that allows `positions` tokens (the weights do not depend on it)."""
    copy = tmp_path / f"{path.name}-{positions}"
    shutil.copytree(path, copy)
    config = json.loads((copy / "config.json").read_text())
    config["max_position_embeddings"] = positions
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("fixture", ["llama_ckpt", "hybrid_ckpt"])
def test_cuda_long_context_greedy_matches_transformers(fixture: str, request: pytest.FixtureRequest,
                                                       make_engine: MakeEngine, tmp_path: Path) -> None:
    """Prompts of 700-3000 tokens decode through CUDA graphs and the Triton kernel (several blocks per
    tile, context ranges merged; full and sliding-window groups) to transformers' greedy tokens."""
    path = _with_positions(request.getfixturevalue(fixture), tmp_path, 4096)
    batch = prompts([3000, 1500, 700], seed=3)
    engine = make_engine(path, device="cuda", block_size=16, num_gpu_blocks=1024, max_num_batched_tokens=1024)
    assert engine.runner.graphs is not None
    for prompt, out in zip(batch, run_all(engine, batch, GREEDY)):
        assert out.output_token_ids == hf_greedy(path, prompt, GREEDY.max_tokens, device="cuda")
