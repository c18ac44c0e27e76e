"""Requests through the engine: validation, abort, stop rules, seeds, logprobs, metrics."""

from __future__ import annotations

import math

import pytest
import torch

from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.errors import EngineError
from pdlaunch.metrics.instance import KV_BLOCKS_TOTAL, KV_BLOCKS_USED, REQUESTS_RUNNING
from pdlaunch.model.demo_tokenizer import EOS_TOKEN_ID
from tests.engine.conftest import MakeEngine, run_all
from tests.helpers.checkpoints import hf_logits

PROMPT = [5, 77, 300, 12, 9, 41, 250, 18, 3, 99, 140]


def greedy(n: int = 12, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)  # type: ignore[arg-type]


def test_bad_requests_are_clear_errors(llama_ckpt, make_engine: MakeEngine) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(llama_ckpt, max_model_len=64)
    with pytest.raises(EngineError) as info:
        engine.add_request("a", [], greedy())
    assert info.value.field == "prompt"
    with pytest.raises(EngineError, match="exceeds max_model_len 64") as info:
        engine.add_request("b", list(range(60)), greedy(8))
    assert info.value.field == "prompt"
    with pytest.raises(EngineError, match=r"prompt\[2\] is token id 100000, outside the model's vocabulary \[0, 512\)"):
        engine.add_request("c", [1, 2, 100000], greedy())
    with pytest.raises(EngineError, match=r"prompt\[0\] is token id -1") as info:
        engine.add_request("c", [-1, 2], greedy())
    assert info.value.field == "prompt" and "0 to 511" in (info.value.hint or "")
    engine.add_request("d", PROMPT, greedy())
    with pytest.raises(EngineError, match="already in use") as info:
        engine.add_request("d", PROMPT, greedy())
    assert info.value.field == "request_id"
    with pytest.raises(EngineError, match="max_model_len") as info:
        make_engine(llama_ckpt, max_model_len=100000)
    assert info.value.field == "model.max_model_len"
    engine.abort_request("d")


def test_request_larger_than_the_cache_is_refused(llama_ckpt, make_engine: MakeEngine) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(llama_ckpt, num_gpu_blocks=4)  # 32 tokens
    with pytest.raises(EngineError, match="KV blocks"):
        engine.add_request("a", list(range(30)), greedy(8))


def test_abort_at_every_stage_frees_every_block(llama_ckpt, make_engine: MakeEngine) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(llama_ckpt, max_num_batched_tokens=8, max_num_seqs=2)
    for steps in range(6):
        for i in range(4):
            engine.add_request(f"r{steps}-{i}", PROMPT * 2, greedy(5))
        for _ in range(steps):
            engine.step()
        for i in range(4):
            out = engine.abort_request(f"r{steps}-{i}")
            assert out is None or (out.finished and out.finish_reason == "abort")
        engine.check_integrity()
        assert engine.block_manager.num_used_blocks() == 0 and not engine.has_unfinished_requests()
    assert engine.abort_request("never-added") is None


def test_stop_token_ids_and_eos(llama_ckpt, make_engine: MakeEngine) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(llama_ckpt)
    ref = run_all(engine, [PROMPT], greedy())[0].output_token_ids
    stop_at = next(i for i, t in enumerate(ref) if i >= 3 and t not in ref[:i])
    out = run_all(engine, [PROMPT], greedy(stop_token_ids=[ref[stop_at]]))[0]
    assert out.finish_reason == "stop" and out.output_token_ids == ref[:stop_at + 1]

    # EOS ends a request unless ignore_eos: make EOS the greedy pick by aborting on it.
    eos_engine = make_engine(llama_ckpt)
    eos_engine.outputs.eos_token_ids = frozenset({ref[stop_at]})
    out = run_all(eos_engine, [PROMPT], SamplingParams(max_tokens=12, temperature=0.0))[0]
    assert out.finish_reason == "stop" and out.output_token_ids == ref[:stop_at + 1]
    assert run_all(eos_engine, [PROMPT], greedy())[0].output_token_ids == ref
    assert EOS_TOKEN_ID in engine.tokenizer.eos_token_ids


def test_stop_string_cuts_text_and_tokens_stop_there(llama_ckpt, make_engine: MakeEngine) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(llama_ckpt)
    full = run_all(engine, [PROMPT], greedy(16))[0]
    text = full.text
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].isprintable()
                and text[i:i + 2].strip() and text.find(text[i:i + 2]) == i)
    cut = text.find(stop)
    out = run_all(engine, [PROMPT], greedy(16, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[:cut]
    assert out.output_token_ids == full.output_token_ids[:len(out.output_token_ids)]
    assert len(out.output_token_ids) < 16


def test_streamed_text_adds_up_to_the_final_text(llama_ckpt, make_engine: MakeEngine) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(llama_ckpt)
    engine.add_request("s", PROMPT, greedy(20))
    pieces, ids = [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            pieces.append(out.new_text)
            ids.extend(out.new_token_ids)
            final = out
    assert "".join(pieces) == final.text and ids == final.output_token_ids and final.finish_reason == "length"
    assert final.text == engine.tokenizer.decode(final.output_token_ids)


def test_seeded_sampling_is_reproducible_and_batch_independent(llama_ckpt, make_engine: MakeEngine) -> None:  # type: ignore[no-untyped-def]
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    alone = run_all(make_engine(llama_ckpt), [PROMPT], seeded)[0].output_token_ids
    others = [SamplingParams(max_tokens=9, temperature=1.0, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0.5, seed=7, ignore_eos=True)]
    engine = make_engine(llama_ckpt)
    outs = run_all(engine, [PROMPT[:5], PROMPT, PROMPT[3:]], [others[0], seeded, others[1]])
    assert outs[1].output_token_ids == alone
    different_seed = seeded.model_copy(update={"seed": 99})
    assert run_all(engine, [PROMPT], different_seed)[0].output_token_ids != alone


def test_logprobs_match_transformers(llama_ckpt, make_engine: MakeEngine) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(llama_ckpt)
    engine.add_request("lp", PROMPT, greedy(3, logprobs=4))
    logprobs = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            logprobs.extend(out.new_logprobs or [])
            final = out
    assert len(logprobs) == 3
    ref = hf_logits(llama_ckpt, PROMPT + final.output_token_ids[:2]).log_softmax(-1)[len(PROMPT) - 1:]
    for i, lp in enumerate(logprobs):
        assert lp.token_id == final.output_token_ids[i]
        assert math.isclose(lp.logprob, ref[i, lp.token_id].item(), abs_tol=1e-4)
        top = ref[i].topk(4)
        assert list(lp.top) == top.indices.tolist()
        assert torch.allclose(torch.tensor(list(lp.top.values())), top.values, atol=1e-4)


def test_stats_and_metrics_follow_the_engine(llama_ckpt, make_engine: MakeEngine) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(llama_ckpt, num_gpu_blocks=64, max_num_seqs=2)
    for i in range(3):
        engine.add_request(f"m{i}", PROMPT, greedy(4))
    engine.step()
    stats = engine.stats()
    assert stats["num_running"] == 2 and stats["num_waiting"] == 1
    assert stats["num_blocks_total"] == 64 and stats["num_blocks_used"] == 4
    assert REQUESTS_RUNNING._value.get() == 2
    assert KV_BLOCKS_USED._value.get() == 4
    assert KV_BLOCKS_TOTAL._value.get() == 64
    while engine.has_unfinished_requests():
        engine.step()
    # The third request found the first block of the prompt cached.
    assert KV_BLOCKS_USED._value.get() == 0
    assert engine.stats()["prompt_tokens_computed"] == 2 * len(PROMPT) + 3
    assert engine.stats()["prompt_tokens_cached"] == 8


def test_colocated_engine_ignores_kv_transfer_params(llama_ckpt, make_engine: MakeEngine) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(llama_ckpt)
    engine.add_request("p", PROMPT, greedy(1), kv_transfer_params={"do_remote_decode": True})
    outs = [o for _ in range(3) for o in engine.step()]
    assert outs[0].finished and outs[0].kv_transfer_params is None
    assert engine.connector is None and engine.role == "colocated"
