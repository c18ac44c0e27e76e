"""Steps with short prompts replayed through the decode graphs, one row per token (runner/cuda_graphs.py's prompt
rows). CPU runs the padded rows eagerly (the torch attention path plans each row as a decode of its own length),
so the row layout, the per-token block tables and sequence lengths and the sampled rows are checked here against
an eager engine; the GPU case compares replayed graphs with eager CUDA steps."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.runner import cuda_graphs
from pdlaunch.runner.cuda_graphs import DecodeGraphs, graph_rows, ladder
from pdlaunch.runner.step_inputs import StepInputs
from tests.engine.conftest import MakeEngine, run_all
from tests.helpers.graphs import GraphRuns, record_graph_runs

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def prompts(lengths: list[int], seed: int, prefix: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [prefix + [rng.randrange(0, 500) for _ in range(n)] for n in lengths]


def _rows_and_sequences(inputs: StepInputs) -> tuple[int, int]:
    return int(inputs.input_ids.shape[0]), len(inputs.query_lens)


@pytest.fixture
def rows_on_cpu(monkeypatch: pytest.MonkeyPatch) -> GraphRuns:
    """((token rows, sequences), ladder size) of every decode-graph step; while `force`, engines are built with
    decode graphs and prompt rows (and no piecewise graphs)."""
    return record_graph_runs(monkeypatch, DecodeGraphs, "decode_graphs", _rows_and_sequences,
                             also={"mixed_graphs": False, "prompt_rows": True})


@pytest.mark.parametrize("fixture", ["llama_ckpt", "hybrid_ckpt", "moe:qwen3_moe"])
def test_steps_with_short_prompts_as_rows_equal_eager(fixture: str, request: pytest.FixtureRequest,
                                                      make_engine: MakeEngine,
                                                      rows_on_cpu: GraphRuns) -> None:
    """Prompts chunked at 24 tokens next to running decodes, chunks over cached context, prefix-cache hits on a
    shared 16-token prefix, a sliding-window group (hybrid) and MoE layers: the steps with prompts run as rows, and the
    tokens equal an eager engine's."""
    path: Path = (request.getfixturevalue("moe_ckpt")(fixture[4:]) if fixture.startswith("moe:")
                  else request.getfixturevalue(fixture))
    shared = prompts([16], seed=1, prefix=[])[0]
    batch = prompts([3, 41, 9, 30, 1, 12], seed=5, prefix=shared)
    options = dict(max_num_seqs=4, max_num_batched_tokens=24, enable_prefix_caching=True)
    engine = make_engine(path, **options)
    assert engine.runner.graphs is not None and engine.runner.graphs.max_batch >= 24
    got = [o.output_token_ids for o in run_all(engine, batch, GREEDY)]
    with_prompts = [(rows, seqs) for (rows, seqs), _ in rows_on_cpu if rows != seqs]
    assert with_prompts, f"no step ran a prompt as rows: {rows_on_cpu}"
    assert any(seqs > 1 for _, seqs in with_prompts), "no prompt ran beside a decode"
    assert all(rows <= size for (rows, _), size in rows_on_cpu)
    rows_on_cpu.clear()
    rows_on_cpu.force = False
    eager = make_engine(path, **options)
    assert eager.runner.graphs is None
    assert [o.output_token_ids for o in run_all(eager, batch, GREEDY)] == got
    assert not rows_on_cpu


def test_a_prompt_chunked_alone_samples_only_its_last_chunk(llama_ckpt: Path, make_engine: MakeEngine,
                                                            rows_on_cpu: GraphRuns) -> None:
    """A 60-token prompt alone at a 24-token budget: two chunk steps as rows that sample nothing, then the last."""
    batch = prompts([60], seed=3, prefix=[])
    options = dict(max_num_seqs=4, max_num_batched_tokens=24)
    got = [o.output_token_ids for o in run_all(make_engine(llama_ckpt, **options), batch, GREEDY)]
    assert [rows_and_seqs for rows_and_seqs, _ in rows_on_cpu[:3]] == [(24, 1), (24, 1), (12, 1)]
    rows_on_cpu.force = False
    assert [o.output_token_ids for o in run_all(make_engine(llama_ckpt, **options), batch, GREEDY)] == got


def _inputs(query_lens: list[int], context_lens: list[int], slot: int = 0) -> StepInputs:
    tokens = sum(query_lens)
    return StepInputs(input_ids=torch.zeros(tokens, dtype=torch.long),
                      positions=torch.cat([torch.arange(c, c + q) for q, c in zip(query_lens, context_lens)]),
                      query_lens=query_lens, context_lens=context_lens,
                      slot_mapping=[torch.full((tokens,), slot, dtype=torch.long)],
                      block_tables=[torch.zeros(len(query_lens), 4, dtype=torch.long)],
                      sample_rows=list(range(tokens)))


def test_which_steps_run_as_rows() -> None:
    """Decode steps always; a prompt only with prompt rows on, at most PROMPT_ROWS_MAX_QUERY tokens, its rows'
    keys within PROMPT_ROWS_MAX_KEYS, every token written (no slot -1), and the rows within the ladder."""
    def graphs(prompt_rows: bool) -> DecodeGraphs:
        return DecodeGraphs(ladder(graph_rows(64, prompt_rows)), 1, 16, 4, torch.device("cpu"), lambda: [],
                            prompt_rows=prompt_rows)

    on, off = graphs(True), graphs(False)
    assert on.max_batch == cuda_graphs.PROMPT_ROWS_GRAPH_ROWS and off.max_batch == 64
    decode = _inputs([1, 1, 1], [5, 9, 2])
    assert on.batch_size_for(decode) == off.batch_size_for(decode) == 4
    turn = _inputs([1] * 16 + [80], [40] * 16 + [48])
    assert on.batch_size_for(turn) == 96 and off.batch_size_for(turn) is None
    long_prompt = cuda_graphs.PROMPT_ROWS_MAX_QUERY + 1
    assert on.batch_size_for(_inputs([long_prompt], [0])) is None
    assert on.batch_size_for(_inputs([64], [cuda_graphs.PROMPT_ROWS_MAX_KEYS // 64])) is None
    assert on.batch_size_for(_inputs([64], [cuda_graphs.PROMPT_ROWS_MAX_KEYS // 64 - 64])) == 64
    assert on.batch_size_for(_inputs([8], [0], slot=-1)) is None
    assert on.batch_size_for(_inputs([100, 29], [0, 0])) is None  # 129 rows: past the ladder
    assert on.batch_size_for(_inputs([0, 2], [4, 0])) is None  # a sequence without a token is no step of rows


def test_rows_load_a_block_table_and_a_length_per_token() -> None:
    """A prompt of 3 tokens after 5 cached ones beside a decode: its rows read its blocks with lengths 6, 7, 8."""
    graphs = DecodeGraphs([8], 1, 4, 3, torch.device("cpu"), lambda: [], prompt_rows=True)
    inputs = _inputs([1, 3], [9, 5])
    inputs.block_tables[0][:] = torch.tensor([[7, 8, 9, -1], [1, 2, -1, -1]])[:, :4]
    inputs.block_tables = [inputs.block_tables[0][:, :3]]
    graphs.load(inputs, 8)
    assert graphs.packed[cuda_graphs._SEQ_LENS].tolist() == [10, 6, 7, 8, 1, 1, 1, 1]
    assert graphs.packed[cuda_graphs._CTX_LENS].tolist() == [9, 5, 6, 7, 0, 0, 0, 0]
    assert graphs.tables[0][:4].tolist() == [[7, 8, 9], [1, 2, 0], [1, 2, 0], [1, 2, 0]]


def test_a_prompts_rows_are_led_in_runs_of_rows_per_program() -> None:
    """Each row's lead (the packed buffer's last row, which the paged decode groups programs by): a prompt's rows in
    runs of rows_per_program led by the run's first, decodes and padding rows leading themselves; a decode step,
    or one program a row, leads every row by itself."""
    graphs = DecodeGraphs([16], 1, 4, 4, torch.device("cpu"), lambda: [], prompt_rows=True, rows_per_program=4)
    inputs = _inputs([1, 6, 1, 3], [9, 5, 2, 4])
    graphs.load(inputs, 16)
    leads = graphs.packed[graphs._leads].tolist()
    assert leads == [0, 1, 1, 1, 1, 5, 5, 7, 8, 8, 8, 11, 12, 13, 14, 15], leads
    graphs.load(_inputs([1, 1, 1], [5, 9, 2]), 16)
    assert graphs.packed[graphs._leads].tolist() == list(range(16))
    alone = DecodeGraphs([16], 1, 4, 4, torch.device("cpu"), lambda: [], prompt_rows=True, rows_per_program=1)
    alone.load(inputs, 16)
    assert alone.packed[alone._leads].tolist() == list(range(16))
    # on CPU the torch attention path plans without them: the metadata carries no leads
    assert graphs.attention(16).row_leads is None


@pytest.mark.gpu
@pytest.mark.parametrize("fixture,extra", [("llama_ckpt", {}), ("hybrid_ckpt", {}), ("moe:qwen3_moe", {}),
                                           ("llama_ckpt", {"kv_cache_dtype": "fp8"})])
def test_replayed_prompt_rows_equal_eager_on_cuda(fixture: str, extra: dict[str, Any], request: pytest.FixtureRequest,
                                                  make_engine: MakeEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA (float32): prompts chunked at 48 tokens, over cached context and next to decodes, replay the decode
    graphs as rows (the default on CUDA; not over an fp8 cache) and give the tokens of an eager engine."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.backends.cuda.matmul.allow_tf32 = False
    path: Path = (request.getfixturevalue("moe_ckpt")(fixture[4:]) if fixture.startswith("moe:")
                  else request.getfixturevalue(fixture))
    runs = record_graph_runs(monkeypatch, DecodeGraphs, "decode_graphs", _rows_and_sequences)
    runs.force = None  # CUDA's own choice of graphs and prompt rows
    shared = prompts([16], seed=2, prefix=[])[0]
    batch = prompts([5, 40, 1, 23, 64, 9, 11], seed=7, prefix=shared)
    options = dict(max_num_seqs=8, max_num_batched_tokens=48, enable_prefix_caching=True, **extra)
    graphed = make_engine(path, device="cuda", **options)
    fp8 = extra.get("kv_cache_dtype") == "fp8"  # prompt rows stay off over an fp8 cache (model_runner.py)
    assert graphed.runner.graphs is not None and graphed.runner.graphs.prompt_rows is not fp8
    got = [o.output_token_ids for o in run_all(graphed, batch, GREEDY)]
    assert any(rows != seqs and seqs > 1 for (rows, seqs), _ in runs) is not fp8, runs
    eager = make_engine(path, device="cuda", enforce_eager=True, **options)
    assert [o.output_token_ids for o in run_all(eager, batch, GREEDY)] == got
