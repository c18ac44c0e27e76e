"""Decode steps through the static, padded buffers of runner/cuda_graphs.py.

CPU runs the padded path eagerly (what CUDA replays from graphs), so the padding and input staging
are checked here on every run; the GPU cases compare replayed graphs with eager steps.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.runner.cuda_graphs import DecodeGraphs, graph_rows, ladder
from tests.engine.conftest import MakeEngine, run_all
from tests.helpers.graphs import GraphRuns, counting_replays, record_graph_runs

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 500) for _ in range(n)] for n in lengths]


def test_ladder_covers_every_batch_up_to_max_num_seqs() -> None:
    assert ladder(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert ladder(5) == [1, 2, 4, 5]
    assert ladder(1) == [1]
    assert ladder(1000)[-1] == 256 and ladder(40) == [1, 2, 4, 8, 16, 32, 40]


@pytest.fixture
def graphs_on_cpu(monkeypatch: pytest.MonkeyPatch) -> GraphRuns:
    return record_graph_runs(monkeypatch, DecodeGraphs, "decode_graphs", lambda inputs: len(inputs.query_lens))


@pytest.mark.parametrize("fixture", ["llama_ckpt", "hybrid_ckpt", "qwen3_tied_ckpt", "llama32_ckpt"])
def test_padded_decode_equals_eager(fixture: str, request: pytest.FixtureRequest, make_engine: MakeEngine,
                                    graphs_on_cpu: GraphRuns) -> None:
    """Batches of 1..6 sequences padded to the ladder (max_num_seqs 6: sizes 1, 2, 4, 6), a
    sliding-window group (hybrid), and preemption under a small cache: same tokens as eager."""
    path = request.getfixturevalue(fixture)
    batch = prompts([3, 17, 9, 30, 1, 12], seed=3)
    graphed = make_engine(path, max_num_seqs=6, max_num_batched_tokens=40, num_gpu_blocks=24)
    assert graphed.runner.graphs is not None and graphed.runner.graphs.sizes == [1, 2, 4, 6]
    got = [o.output_token_ids for o in run_all(graphed, batch, GREEDY)]
    assert graphs_on_cpu and any(rows < size for rows, size in graphs_on_cpu), "no padded step ran"
    assert {size for _, size in graphs_on_cpu} <= {1, 2, 4, 6}
    graphs_on_cpu.clear()
    graphs_on_cpu.force = False
    eager = make_engine(path, max_num_seqs=6, max_num_batched_tokens=40, num_gpu_blocks=24)
    assert eager.runner.graphs is None
    assert [o.output_token_ids for o in run_all(eager, batch, GREEDY)] == got


def test_steps_the_buffers_cannot_hold_run_eagerly(llama_ckpt, make_engine: MakeEngine,  # type: ignore[no-untyped-def]
                                                   graphs_on_cpu: GraphRuns) -> None:
    """Prefill steps never take the padded path; decode steps do."""
    engine = make_engine(llama_ckpt, max_num_seqs=2)
    out = run_all(engine, prompts([20, 4]), SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    assert all(len(o.output_token_ids) == 3 for o in out)
    # Step 1 prefills both prompts (eager); steps 2 and 3 decode both (padded path).
    assert graphs_on_cpu == [(2, 2), (2, 2)]


@pytest.mark.gpu
@pytest.mark.parametrize("fixture", ["llama_ckpt", "mistral_ckpt", "hybrid_ckpt"])
def test_cuda_graph_replay_equals_eager(fixture: str, request: pytest.FixtureRequest,
                                        make_engine: MakeEngine) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    path = request.getfixturevalue(fixture)
    batch = prompts([5, 40, 1, 23, 64, 9, 11], seed=7)
    graphed = make_engine(path, device="cuda", max_num_seqs=8)
    graphs = graphed.runner.graphs
    assert graphs is not None and set(graphs.graphs) == set(graphs.sizes)
    with counting_replays() as replays:
        got = [o.output_token_ids for o in run_all(graphed, batch, GREEDY)]
    assert replays[0] >= GREEDY.max_tokens - 1
    eager = make_engine(path, device="cuda", max_num_seqs=8, enforce_eager=True)
    assert eager.runner.graphs is None
    assert [o.output_token_ids for o in run_all(eager, batch, GREEDY)] == got



@pytest.mark.gpu
def test_a_replayed_greedy_step_samples_the_argmax_its_graph_computed(llama_ckpt, make_engine: MakeEngine,  # type: ignore[no-untyped-def]
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode graph ends with its logits' argmax: a greedy step that replays it launches no argmax of its own
    (the sampler's runs only for the steps that did not replay it), and a step whose logits a processor changes
    computes it again over the changed logits."""
    import pdlaunch.engine.sampler as sampler

    calls: list[int] = []
    real = sampler.argmax_rows  # type: ignore[attr-defined]

    def counted(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return real(x)

    monkeypatch.setattr(sampler, "argmax_rows", counted)
    graphed = make_engine(llama_ckpt, device="cuda", max_num_seqs=4)
    runs, replays = [0], [0]
    real_run, graphs = graphed.runner.run, graphed.runner.graphs
    assert graphs is not None
    real_replay = graphs.run

    def counted_run(inputs: Any) -> torch.Tensor:
        runs[0] += 1
        return real_run(inputs)

    def counted_replay(*args: Any) -> Any:
        replays[0] += 1
        return real_replay(*args)

    graphed.runner.run = counted_run  # type: ignore[method-assign]
    graphs.run = counted_replay  # type: ignore[method-assign,assignment]
    batch = prompts([5, 9, 30], seed=3)
    got = [o.output_token_ids for o in run_all(graphed, batch, GREEDY)]
    assert replays[0] >= GREEDY.max_tokens - 1 and len(calls) <= runs[0] - replays[0], (calls, runs, replays)
    eager = make_engine(llama_ckpt, device="cuda", max_num_seqs=4, enforce_eager=True)
    assert [o.output_token_ids for o in run_all(eager, batch, GREEDY)] == got
    calls.clear()
    replays[0] = 0
    banned = got[0][3]
    biased = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logit_bias={banned: -100.0})
    out = run_all(graphed, batch, biased)
    assert replays[0] >= 1 and len(calls) >= replays[0], (calls, replays)
    assert all(banned not in o.output_token_ids for o in out)


def _sleep_cycle_with_graphs(path: str) -> dict[str, Any]:
    """In a fresh process (the CuMem allocator serves one engine per process)."""
    from pdlaunch.engine.llm import build_config
    from pdlaunch.engine.llm_engine import LLMEngine

    engine = LLMEngine(build_config(path, "cuda", "float32", {"enable_sleep_mode": True, "max_num_seqs": 4,
                                                               "block_size": 8, "num_gpu_blocks": 256}))
    try:
        graphs = engine.runner.graphs
        assert graphs is not None
        batch = prompts([5, 9, 30], seed=11)
        report: dict[str, Any] = {"captured": sorted(graphs.graphs)}
        report["before"] = [o.output_token_ids for o in run_all(engine, batch, GREEDY)]
        engine.sleep(1)
        engine.wake_up(None)
        report["awake"] = sorted(graphs.graphs)
        report["after"] = [o.output_token_ids for o in run_all(engine, batch, GREEDY)]
        return report
    finally:
        engine.shutdown()


@pytest.mark.gpu
def test_cuda_graphs_replay_after_sleep_and_wake(llama_ckpt) -> None:  # type: ignore[no-untyped-def]
    """CuMem keeps the weights' and KV's addresses across sleep: the graphs replay correctly after it."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        report = pool.apply(_sleep_cycle_with_graphs, (str(llama_ckpt),))
    sizes = ladder(graph_rows(4, prompt_rows=True))  # max_num_seqs 4; short prompts run as rows (cuda_graphs.py)
    assert report["captured"] == sizes and report["awake"] == sizes
    assert report["after"] == report["before"]
