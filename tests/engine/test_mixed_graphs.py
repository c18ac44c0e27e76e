"""Steps with prompt tokens through the piecewise buffers of runner/mixed_graphs.py.

CPU runs the padded pieces eagerly (what CUDA replays from graphs, with eager attention between them), so the
padding, the staging and the cut at every attention are checked here on every run; the GPU cases compare
replayed pieces with eager steps.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.errors import PdlaunchError
from pdlaunch.runner.mixed_graphs import MixedGraphs, max_mixed_tokens, mixed_ladder
from tests.engine.conftest import MakeEngine, run_all
from tests.engine.test_engine_connector import spec
from tests.helpers.graphs import GraphRuns, counting_replays, record_graph_runs

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def prompts(lengths: list[int], seed: int = 0, prefix: list[int] | None = None) -> list[list[int]]:
    rng = random.Random(seed)
    return [(prefix or []) + [rng.randrange(0, 500) for _ in range(n)] for n in lengths]


def test_ladder_pads_by_at_most_a_quarter_from_1024_tokens() -> None:
    assert mixed_ladder(8192) == [16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048]
    assert mixed_ladder(8192, 8192) == [16, 32, 64, 128, 256, *range(512, 8192 + 1, 256)]
    assert mixed_ladder(16384, 8192) == mixed_ladder(8192, 8192)  # larger steps run eagerly
    assert mixed_ladder(3000, 8192) == [16, 32, 64, 128, 256, *range(512, 2816 + 1, 256), 3000]
    assert mixed_ladder(1024) == [16, 32, 64, 128, 256, 512, 768, 1024]
    assert mixed_ladder(40) == [16, 32, 40]
    assert mixed_ladder(600) == [16, 32, 64, 128, 256, 512, 600]
    assert mixed_ladder(8) == [8]


def test_ladder_is_fine_above_a_capped_chunk() -> None:
    """A 1024-token chunk beside up to 64 decodes (the defaults) pads to 1088, not 1280; beside up to 256, to the
    next 64 tokens; no cap, or a chunk at the top, adds nothing."""
    coarse = mixed_ladder(8192)
    assert mixed_ladder(8192, 2048, 1024, 64) == sorted([*coarse, 1088])
    assert mixed_ladder(8192, 2048, 1024, 256) == sorted([*coarse, 1088, 1152, 1216])
    assert mixed_ladder(8192, 2048, 1024, 40) == sorted([*coarse, 1088])
    assert mixed_ladder(8192, 2048, 0, 64) == mixed_ladder(8192, 2048, 2048, 64) == coarse


def test_moe_models_replay_steps_up_to_the_default_budget_dense_ones_up_to_2048(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PDLAUNCH_MIXED_GRAPH_TOKENS", raising=False)
    assert (max_mixed_tokens(moe=False), max_mixed_tokens(moe=True)) == (2048, 8192)
    monkeypatch.setenv("PDLAUNCH_MIXED_GRAPH_TOKENS", "4096")
    assert max_mixed_tokens(moe=False) == max_mixed_tokens(moe=True) == 4096
    for bad in ("0", "-5", "many"):
        monkeypatch.setenv("PDLAUNCH_MIXED_GRAPH_TOKENS", bad)
        with pytest.raises(PdlaunchError) as err:
            max_mixed_tokens(moe=True)
        assert err.value.field == "PDLAUNCH_MIXED_GRAPH_TOKENS" and repr(bad) in str(err.value)


def test_an_moe_model_whose_large_pieces_do_not_fit_keeps_the_dense_ladder(
        moe_ckpt: Callable[[str], Path], make_engine: MakeEngine, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, pieces_on_cpu: GraphRuns) -> None:
    """Capturing pieces up to 8192 tokens runs out of memory: the runner captures the 2048-token ladder
    instead (not none at all), says so, and steps still run their pieces."""
    monkeypatch.delenv("PDLAUNCH_MIXED_GRAPH_TOKENS", raising=False)
    tried: list[int] = []

    def capture(self: MixedGraphs) -> None:
        tried.append(self.sizes[-1])
        if self.sizes[-1] > 2048:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")

    monkeypatch.setattr(MixedGraphs, "capture", capture)
    with caplog.at_level(logging.WARNING, logger="pdlaunch.runner.graph_setup"):
        engine = make_engine(moe_ckpt("qwen3_moe"), max_num_batched_tokens=8192)
    assert tried == [8192, 2048]
    assert engine.runner.mixed is not None and engine.runner.mixed.sizes[-1] == 2048
    assert "steps up to 8192 tokens failed (CUDA out of memory. Tried to allocate 1.50 GiB); trying up to 2048" \
        in caplog.text and "steps with prompt tokens run eagerly" not in caplog.text
    out = run_all(engine, prompts([300]), GREEDY)
    assert len(out[0].output_token_ids) == GREEDY.max_tokens
    assert (300, 512) in pieces_on_cpu


@pytest.fixture
def pieces_on_cpu(monkeypatch: pytest.MonkeyPatch) -> GraphRuns:
    return record_graph_runs(monkeypatch, MixedGraphs, "mixed_graphs", lambda inputs: int(inputs.input_ids.shape[0]))


@pytest.mark.parametrize("fixture", ["llama_ckpt", "hybrid_ckpt", "qwen3_tied_ckpt", "moe:qwen3_moe", "moe:olmoe"])
def test_piecewise_steps_equal_eager(fixture: str, request: pytest.FixtureRequest, make_engine: MakeEngine,
                                     pieces_on_cpu: GraphRuns) -> None:
    """Prompts chunked at 24 tokens next to running decodes, a chunk over cached context, a sliding-window
    group (hybrid), MoE layers, prefix-cache hits (a shared 16-token prefix) and async scheduling's pending
    rows: every step with a prompt in it runs the padded pieces and the tokens equal an eager engine's."""
    path: Path = (request.getfixturevalue("moe_ckpt")(fixture[4:]) if fixture.startswith("moe:")
                  else request.getfixturevalue(fixture))
    shared = prompts([16], seed=1)[0]
    batch = prompts([3, 41, 9, 30, 1, 12], seed=5, prefix=shared)
    options = dict(max_num_seqs=4, max_num_batched_tokens=24, enable_prefix_caching=True)
    got = [o.output_token_ids for o in run_all(make_engine(path, **options), batch, GREEDY)]
    assert pieces_on_cpu, "no step ran the piecewise path"
    assert all(size in (16, 24) and tokens <= size for tokens, size in pieces_on_cpu)
    assert any(tokens < size for tokens, size in pieces_on_cpu), "no padded piecewise step ran"
    pieces_on_cpu.clear()
    pieces_on_cpu.force = False
    eager = make_engine(path, **options)
    assert eager.runner.mixed is None
    assert [o.output_token_ids for o in run_all(eager, batch, GREEDY)] == got
    assert not pieces_on_cpu


def test_a_capped_chunk_beside_decodes_pads_to_the_fine_size_above_it(llama_ckpt: Path, make_engine: MakeEngine,
                                                                      pieces_on_cpu: GraphRuns) -> None:
    """--prompt-tokens-while-decoding 256 with 4 sequences: the runner captures 320 beside the coarse ladder, a
    step of a 256-token chunk and one decode pads to it (not to 512), and the tokens equal an eager engine's; a
    prefill instance, which runs no decodes, keeps the coarse ladder."""
    options = dict(max_num_seqs=4, max_num_batched_tokens=512, prompt_tokens_while_decoding=256,
                   enable_prefix_caching=False)
    long_params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    short, long = prompts([5, 300], seed=3)

    def serve(engine: Any) -> dict[str, list[int]]:
        engine.add_request("short", short, GREEDY)
        engine.step()  # its prompt alone: it decodes from the next step on
        engine.add_request("long", long, long_params)
        done: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.output_token_ids
        return done

    engine = make_engine(llama_ckpt, **options)
    assert engine.runner.mixed is not None and engine.runner.mixed.sizes == [16, 32, 64, 128, 256, 320, 512]
    got = serve(engine)
    assert (257, 320) in pieces_on_cpu  # the chunk and the decode beside it
    prefill = make_engine(llama_ckpt, instance=spec("prefill", "prefill"), **options)
    assert prefill.runner.mixed is not None and prefill.runner.mixed.sizes == [16, 32, 64, 128, 256, 512]  # no decodes
    pieces_on_cpu.force = False
    assert serve(make_engine(llama_ckpt, **options)) == got


def test_prompt_logprobs_and_sampling_through_the_pieces(llama_ckpt: Path, make_engine: MakeEngine,
                                                         pieces_on_cpu: GraphRuns) -> None:
    """Prompt logprobs read the pieces' hidden states; seeded sampling sees the same logits as eager."""
    batch = prompts([7, 19, 26], seed=9)
    params = [SamplingParams(max_tokens=6, temperature=0.0, prompt_logprobs=2, ignore_eos=True),
              SamplingParams(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True),
              SamplingParams(max_tokens=6, temperature=0.0, logprobs=1, ignore_eos=True)]

    def outputs(engine: Any) -> list[tuple[list[int], Any]]:
        for i, (prompt, p) in enumerate(zip(batch, params)):
            engine.add_request(f"r{i}", prompt, p)
        ids: dict[str, list[int]] = {}
        prompt_lp: dict[str, Any] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.prompt_logprobs is not None:
                    prompt_lp[out.request_id] = out.prompt_logprobs
                if out.finished:
                    ids[out.request_id] = out.output_token_ids
        return [(ids[f"r{i}"], prompt_lp.get(f"r{i}")) for i in range(len(batch))]

    got = outputs(make_engine(llama_ckpt, max_num_batched_tokens=32))
    assert pieces_on_cpu
    pieces_on_cpu.force = False
    want = outputs(make_engine(llama_ckpt, max_num_batched_tokens=32))
    assert [ids for ids, _ in got] == [ids for ids, _ in want]
    got_lp, want_lp = got[0][1], want[0][1]
    assert got_lp is not None and want_lp is not None and len(got_lp) == len(want_lp) == 7
    for a, b in zip(got_lp[1:], want_lp[1:]):
        assert a is not None and b is not None
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-5)


def test_steps_larger_than_the_ladder_run_eagerly(llama_ckpt: Path, make_engine: MakeEngine,
                                                  pieces_on_cpu: GraphRuns) -> None:
    """The ladder stops at the step budget: a padded step never exceeds it, and decode steps that the decode
    graphs take (on by default only on CUDA; off here) still run the pieces when nothing else takes them."""
    engine = make_engine(llama_ckpt, max_num_seqs=2, max_num_batched_tokens=64)
    runner = engine.runner
    assert runner.mixed is not None and runner.mixed.sizes == [16, 32, 64]
    assert runner.mixed.bufs.tokens == 64
    out = run_all(engine, prompts([50, 4]), SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    assert all(len(o.output_token_ids) == 3 for o in out)
    # Step 1: both prompts (54 tokens, padded to 64); steps 2 and 3 decode both (2 tokens, padded to 16).
    assert pieces_on_cpu == [(54, 64), (2, 16), (2, 16)]


def test_padding_rows_write_nothing_to_the_cache(llama_ckpt: Path, make_engine: MakeEngine,
                                                 pieces_on_cpu: GraphRuns) -> None:
    """Padding rows carry slot -1: after a padded step the cache holds exactly the step's tokens' rows."""
    engine = make_engine(llama_ckpt, max_num_seqs=1, num_gpu_blocks=16)
    runner = engine.runner
    before = [c.clone() for c in runner.kv_caches]
    run_all(engine, prompts([5]), SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    assert pieces_on_cpu == [(5, 16)]
    changed = [(c != b).flatten(2).any(-1) for c, b in zip(runner.kv_caches, before)]  # [blocks, layers] per group
    # 5 prompt tokens (block size 8): one block written, every layer of it; no other block touched.
    assert int(changed[0].any(-1).sum()) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("fixture,extra", [("llama_ckpt", {}), ("hybrid_ckpt", {}), ("moe:qwen3_moe", {}),
                                           ("llama_ckpt", {"kv_cache_dtype": "fp8"})])
def test_piecewise_replay_equals_eager(fixture: str, extra: dict[str, Any], request: pytest.FixtureRequest,
                                       make_engine: MakeEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA: every piece captured at every ladder size; steps with prompts (chunked at 48 tokens, over cached
    context, next to decodes) replay them and give the tokens of an eager engine (float32). (Prompts this short
    would run as decode-graph rows: test_prompt_rows.py; off here.)"""
    monkeypatch.setenv("PDLAUNCH_PROMPT_ROWS", "off")
    torch.backends.cuda.matmul.allow_tf32 = False
    path: Path = (request.getfixturevalue("moe_ckpt")(fixture[4:]) if fixture.startswith("moe:")
                  else request.getfixturevalue(fixture))
    shared = prompts([16], seed=2)[0]
    batch = prompts([5, 40, 1, 23, 64, 9, 11], seed=7, prefix=shared)
    options = dict(max_num_seqs=8, max_num_batched_tokens=48, enable_prefix_caching=True, **extra)
    graphed = make_engine(path, device="cuda", **options)
    mixed = graphed.runner.mixed
    assert mixed is not None and mixed.sizes == [16, 32, 48]
    assert all(len(pieces) == graphed.runner.model.num_pieces for pieces in mixed.graphs.values())
    assert set(mixed.graphs) == set(mixed.sizes)
    with counting_replays() as replays:
        got = [o.output_token_ids for o in run_all(graphed, batch, GREEDY)]
    # At least the prompt steps (8 x 48 tokens hold the 209 prompt tokens at most) replayed every piece.
    assert replays[0] >= 5 * graphed.runner.model.num_pieces
    eager = make_engine(path, device="cuda", enforce_eager=True, **options)
    assert eager.runner.mixed is None and eager.runner.graphs is None
    assert [o.output_token_ids for o in run_all(eager, batch, GREEDY)] == got


def test_a_failed_capture_leaves_those_steps_eager_with_a_warning(llama_ckpt: Path, make_engine: MakeEngine,
                                                                  pieces_on_cpu: GraphRuns,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A piece that cannot be captured (a host sync in some model's path, or no memory left for the pool) does
    not stop the instance: its steps with prompts run eagerly and the log says why and what to do."""
    def failing_capture(self: MixedGraphs) -> None:
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(MixedGraphs, "capture", failing_capture)
    with caplog.at_level("WARNING", logger="pdlaunch.runner.graph_setup"):
        engine = make_engine(llama_ckpt)
    assert engine.runner.mixed is None
    assert "capturing their piecewise CUDA graphs failed (operation not permitted when stream is capturing)" \
        in caplog.text and "--enforce-eager" in caplog.text
    out = run_all(engine, prompts([20]), SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    assert len(out[0].output_token_ids) == 3 and not pieces_on_cpu
