"""Async scheduling (engine/async_step.py) gives the tokens of one step at a time: on and off compared on
greedy and seeded sampling, stop ids and strings, penalties, structured output, n > 1 prompts, aborts, prefix
caching, chunked prefill and PD loads arriving mid-batch."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from pdlaunch.engine import engine_step
from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.engine.outputs import RequestOutput, SamplingParams
from pdlaunch.engine.structured_output import StructuredOutput
from tests.engine.conftest import MakeEngine, run_all
from tests.engine.test_engine_batching import mixed_prompts, tokens
from tests.engine.test_engine_connector import CopyConnector, Hub, prefill, spec

MODES = {"on": True, "off": False}


def _engines(make_engine: MakeEngine, path: Path, **kw: Any) -> dict[str, LLMEngine]:
    engines = {mode: make_engine(path, async_scheduling=on, **kw) for mode, on in MODES.items()}
    assert engines["on"].async_scheduling and not engines["off"].async_scheduling
    return engines


@pytest.fixture
def deferred(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many sampled steps left their ids on the device (the overlapped path ran)."""
    count: list[int] = []
    real = engine_step.in_flight

    def counting(*args: Any) -> Any:
        count.append(1)
        return real(*args)

    monkeypatch.setattr(engine_step, "in_flight", counting)
    return count


def _texts(outs: list[RequestOutput]) -> list[tuple[list[int], str, str | None]]:
    return [(o.output_token_ids, o.text, o.finish_reason) for o in outs]


def test_greedy_seeded_stops_penalties_and_prefix_caching_are_the_same_on_and_off(
        llama_ckpt: Path, make_engine: MakeEngine, deferred: list[int]) -> None:
    shared = mixed_prompts(1, seed=21, max_len=30)[0] + [4] * 24
    prompts = mixed_prompts(8, seed=2, max_len=50) + [shared + p for p in mixed_prompts(3, seed=3, max_len=10)]
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    reference = tokens(run_all(make_engine(llama_ckpt, async_scheduling=False), prompts, greedy))
    # data-dependent stops: a token id and a text piece the reference outputs contain mid-way
    stop_id = reference[2][4]
    params = [
        greedy,
        SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[stop_id]),
        SamplingParams(max_tokens=10, temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.4),
        SamplingParams(max_tokens=10, temperature=1.0, seed=3, presence_penalty=0.5, min_tokens=3),
        SamplingParams(max_tokens=1, temperature=0.0),
        SamplingParams(max_tokens=10, temperature=0.8, seed=11, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.8, seed=12, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.0, logprobs=2, ignore_eos=True),
        greedy,
        SamplingParams(max_tokens=6, temperature=0.7, seed=5, ignore_eos=True),
    ]
    engines = _engines(make_engine, llama_ckpt, max_num_batched_tokens=24, max_num_seqs=6)
    results = {mode: run_all(engine, prompts, params) for mode, engine in engines.items()}
    assert _texts(results["on"]) == _texts(results["off"])
    assert results["on"][2].finish_reason == "stop" and len(results["on"][2].output_token_ids) < 10
    assert tokens(results["on"])[0] == reference[0]
    assert [o.new_logprobs for o in results["on"]][8] == [o.new_logprobs for o in results["off"]][8]
    assert deferred, "no step left its sampled ids on the device"

    stop_text = results["off"][0].text[3:6]  # a stop string from the middle of a text
    with_stop = [SamplingParams(max_tokens=10, temperature=0.0, stop=[stop_text])] * 3
    again = {mode: run_all(engine, prompts[:1] * 2 + prompts[9:10], with_stop) for mode, engine in engines.items()}
    assert _texts(again["on"]) == _texts(again["off"]) and again["on"][0].finish_reason == "stop"
    # the second pass of the shared-prefix prompts ran from the prefix cache, alike in both modes
    cached = {mode: run_all(engine, prompts[8:], params[8:]) for mode, engine in engines.items()}
    assert _texts(cached["on"]) == _texts(cached["off"]) == _texts(results["off"][8:])
    assert all(o.num_cached_tokens > 0 for o in cached["on"])


def test_n_copies_structured_output_and_aborts_on_and_off(llama_ckpt: Path, make_engine: MakeEngine) -> None:
    prompt = [5, 6, 7, 8, 9, 10]
    # n > 1 as the server runs it: n requests of one prompt, seeds seed, seed + 1, ...
    copies = [SamplingParams(max_tokens=8, temperature=1.0, seed=40 + i, ignore_eos=True) for i in range(3)]
    regex = SamplingParams(max_tokens=12, temperature=0.0,
                           structured_output=StructuredOutput(kind="regex", value="(ab|cd){1,4}x"))
    engines = _engines(make_engine, llama_ckpt)
    results = {mode: run_all(engine, [prompt] * 4, [*copies, regex]) for mode, engine in engines.items()}
    assert _texts(results["on"]) == _texts(results["off"])
    assert len({tuple(o.output_token_ids) for o in results["on"][:3]}) > 1  # the copies differ
    assert results["on"][3].finish_reason == "stop" and results["on"][3].text.endswith("x")

    # aborts mid-run: the others are untouched, the aborted one stops with a prefix of its tokens
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = mixed_prompts(4, seed=9, max_len=20)
    reference = tokens(run_all(engines["off"], prompts, greedy))
    for mode, engine in engines.items():
        for i, p in enumerate(prompts):
            engine.add_request(f"{mode}-{i}", p, greedy)
        final: dict[str, RequestOutput] = {}
        streamed: dict[str, list[int]] = {f"{mode}-{i}": [] for i in range(len(prompts))}
        for step in range(100):
            if step == 4:
                aborted = engine.abort_request(f"{mode}-1")
                assert aborted is not None and aborted.finished and aborted.finish_reason == "abort"
            for out in engine.step():
                streamed[out.request_id].extend(out.new_token_ids)
                if out.finished:
                    final[out.request_id] = out
            engine.check_integrity()
            if not engine.has_unfinished_requests():
                break
        assert [streamed[f"{mode}-{i}"] for i in (0, 2, 3)] == [reference[i] for i in (0, 2, 3)]
        cut = streamed[f"{mode}-1"]
        assert 0 < len(cut) < 12 and cut == reference[1][:len(cut)]
        assert f"{mode}-1" not in final


def test_pd_loads_arriving_mid_batch_on_and_off(llama_ckpt: Path, make_engine: MakeEngine,
                                                deferred: list[int]) -> None:
    rng = random.Random(5)
    prompts = [[rng.randrange(500) for _ in range(n)] for n in (9, 30, 17, 4)]
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    reference = tokens(run_all(make_engine(llama_ckpt, async_scheduling=False), prompts + prompts[:2], greedy))
    results: dict[str, list[list[int]]] = {}
    for mode, on in MODES.items():
        hub = Hub()
        p_engine = make_engine(llama_ckpt, instance=spec("prefill", f"P{mode}"), async_scheduling=on,
                               connector=CopyConnector(hub, f"P{mode}"), max_num_batched_tokens=16)
        d_engine = make_engine(llama_ckpt, instance=spec("decode", f"D{mode}"), async_scheduling=on,
                               connector=CopyConnector(hub, f"D{mode}"))
        p_outs = prefill(p_engine, prompts)
        # two local requests decode; the loaded ones join one by one while they run
        for i, p in enumerate(prompts[:2]):
            d_engine.add_request(f"local{i}", p, greedy)
        final: dict[str, RequestOutput] = {}
        pending = list(p_outs)
        while d_engine.has_unfinished_requests() or pending:
            if pending:
                o = pending.pop(0)
                d_engine.add_request(o.request_id, prompts[int(o.request_id[1:])], greedy, o.kv_transfer_params)
            final.update({o.request_id: o for o in d_engine.step() if o.finished})
            d_engine.check_integrity()
        results[mode] = [final[f"p{i}"].output_token_ids for i in range(len(prompts))] + \
            [final[f"local{i}"].output_token_ids for i in range(2)]
        p_engine.step()  # the notifications arrive: held blocks go back
        assert p_engine.block_manager.num_used_blocks() == 0
    assert results["on"] == results["off"] == reference
    assert deferred


@pytest.mark.gpu
def test_on_and_off_agree_on_cuda_with_graphs(llama_ckpt: Path, make_engine: MakeEngine, deferred: list[int]) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    prompts = mixed_prompts(12, seed=4, max_len=60)
    params = [SamplingParams(max_tokens=16, temperature=0.0 if i % 3 else 0.8, seed=i, ignore_eos=True)
              for i in range(len(prompts))]
    engines = _engines(make_engine, llama_ckpt, device="cuda", max_num_seqs=8)
    results = {mode: run_all(engine, prompts, params) for mode, engine in engines.items()}
    assert tokens(results["on"]) == tokens(results["off"]) and deferred


def test_unset_it_runs_with_cuda_only_and_set_it_is_what_it_says(llama_ckpt: Path, make_engine: MakeEngine) -> None:
    """scheduler.async_scheduling unset: off on CPU (the host computes each step itself: nothing overlaps), on
    with CUDA; true and false hold on either device (TP 1, no offload)."""
    assert make_engine(llama_ckpt).async_scheduling is False
    assert make_engine(llama_ckpt, async_scheduling=True).async_scheduling is True
    cpu = make_engine(llama_ckpt, async_scheduling=False)
    config = cpu.config.model_copy(deep=True)
    for setting, on_cuda in ((None, True), (True, True), (False, False)):
        config.scheduler.async_scheduling = setting
        as_if_cuda = SimpleNamespace(device=torch.device("cuda"), tp_size=1, offload=None)
        assert LLMEngine._async_scheduling(as_if_cuda, config) is on_cuda, setting
    config.scheduler.async_scheduling = None
    two_ranks = SimpleNamespace(device=torch.device("cuda"), tp_size=2, offload=None)
    assert LLMEngine._async_scheduling(two_ranks, config) is False


@pytest.mark.parametrize("pd", [True, False], ids=["pd_prefill", "colocated"])
def test_a_request_whose_last_token_is_in_flight_is_never_preempted(llama_ckpt: Path, make_engine: MakeEngine,
                                                                      pd: bool) -> None:
    """Blocks run out while a request's only token is in flight: the request that needs the block gives its own
    back, not the newer one whose token ends it. A PD prefill preempted then finished with no blocks: its answer
    named none (remote_block_ids [[]]) and nothing was held, so its decode's load failed."""
    long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    (reference,) = tokens(run_all(make_engine(llama_ckpt, async_scheduling=False), [list(range(10, 18))], long))
    hub = Hub()
    # 9 blocks of 8: "long" holds 3 at 23 tokens, "one" takes the other 6, and "long"'s 25th token needs a 10th
    p_engine = make_engine(llama_ckpt, instance=spec("prefill", "P"), connector=CopyConnector(hub, "P"),
                           async_scheduling=True, num_gpu_blocks=9)
    p_engine.add_request("long", list(range(10, 18)), long)
    first = p_engine.scheduler.requests["long"]
    one_prompt = list(range(100, 148))
    final: dict[str, RequestOutput] = {}
    for _ in range(200):
        if first.num_computed_tokens == 23 and "one" not in p_engine.scheduler.requests and "one" not in final:
            p_engine.add_request("one", one_prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
                                 {"do_remote_decode": True} if pd else None)
        final.update({o.request_id: o for o in p_engine.step() if o.finished})
        p_engine.check_integrity()
        if "one" in final:
            break
    one = final["one"]
    assert one.finish_reason == "length" and len(one.output_token_ids) == 1
    if pd:
        assert one.kv_transfer_params is not None
        (block_ids,) = one.kv_transfer_params["remote_block_ids"]
        assert len(block_ids) == len(one_prompt) // 8 and min(block_ids) >= 0
        assert list(p_engine.scheduler.held) == ["one"]
        # the decode loads it: the prefill's hold ends and "long" gets its blocks back
        d_engine = make_engine(llama_ckpt, instance=spec("decode", "D"), connector=CopyConnector(hub, "D"))
        d_engine.add_request("one", one_prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
                             one.kv_transfer_params)
        while d_engine.has_unfinished_requests():
            final.update({o.request_id: o for o in d_engine.step() if o.finished})
        assert final["one"].output_token_ids[:1] == one.output_token_ids
    assert p_engine.scheduler.num_preemptions == 1 and first.num_preemptions == 1  # the one that needed the block
    for _ in range(500):
        if not p_engine.has_unfinished_requests():
            break
        final.update({o.request_id: o for o in p_engine.step() if o.finished})
        p_engine.check_integrity()
    assert final["long"].output_token_ids == reference
    assert not p_engine.scheduler.held and p_engine.block_manager.num_used_blocks() == 0
