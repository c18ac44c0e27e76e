"""A replayed step's inputs staged in one buffer and scattered by one launch (runner/stage_inputs.py).

`scatter` runs as torch ops on CPU, as the Triton kernel on CUDA (gpu marker) and under TRITON_INTERPRET=1 (in a
child pytest: Triton reads the variable at import); every way must give the buffers the plain copies gave. Then an
engine whose decode steps take the padded path (CPU runs it eagerly on the same buffers) with async scheduling
on, so the in-flight step's ids are filled in by the scatter: the same tokens as with it off.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.runner import stage_inputs
from pdlaunch.runner.cuda_graphs import DecodeGraphs
from pdlaunch.runner.stage_inputs import StageLayout, scatter
from tests.engine.conftest import MakeEngine, run_all
from tests.engine.test_engine_batching import mixed_prompts, tokens
from tests.helpers.graphs import GraphRuns, record_graph_runs
from tests.model.interpreter import INTERPRET_AT_START, run_interpreter_child


@pytest.fixture(params=["torch", pytest.param("cuda", marks=pytest.mark.gpu), "interpret"])
def where(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How scatter runs: torch ops on CPU, the kernel on CUDA, the kernel in the interpreter (in the child)."""
    monkeypatch.delenv("PDLAUNCH_FUSED_OPS", raising=False)
    if request.param == "interpret":
        pytest.importorskip("triton")
        if not INTERPRET_AT_START:
            pytest.skip("runs in the child of test_interpreter_cases_in_a_subprocess")
    elif request.param == "torch":
        if INTERPRET_AT_START:
            pytest.skip("the parent runs it")
        monkeypatch.setattr(stage_inputs, "_use_kernel", lambda t: False)
    elif not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return request.param


def test_interpreter_cases_in_a_subprocess() -> None:
    run_interpreter_child(__file__, "interpret", passed="3 passed")


@pytest.mark.parametrize("batch,n,widths,pending", [
    (1, 1, [8], {0: 0}),  # a batch-1 decode whose id is in flight
    (8, 6, [5, 3], {0: 2, 3: 0, 5: 1}),  # two KV groups, some rows' ids in flight, padding rows
    (300, 257, [40], {}),  # more than one program, nothing in flight
])
def test_scatter_gives_the_buffers_the_plain_copies(where: str, batch: int, n: int, widths: list[int],
                                                    pending: dict[int, int]) -> None:
    device = torch.device("cuda" if where == "cuda" else "cpu")
    gen = torch.Generator().manual_seed(batch)
    rows, big, max_blocks = 7, 320, 64
    pend_row, ids_row = rows - 1, 0
    values = torch.randint(0, 10**6, (rows, batch), generator=gen)
    values[pend_row] = -1
    for row, src in pending.items():
        values[pend_row, row] = src
    tables = [torch.randint(0, 10**5, (n, w), generator=gen) for w in widths]
    source = torch.randint(10**7, 2 * 10**7, (4,), generator=gen) if pending else None
    layout = StageLayout.of(rows, batch, n, widths)
    stage = torch.cat([values.view(-1), *(t.view(-1) for t in tables)])
    assert stage.numel() == layout.size
    packed = torch.full((rows, big), -7, dtype=torch.long)
    out_tables = [torch.full((big, max_blocks), -7, dtype=torch.long) for _ in widths]
    want_packed, want_tables = packed.clone(), [t.clone() for t in out_tables]
    want_packed[:, :batch] = values
    for row, src in pending.items():
        assert source is not None
        want_packed[ids_row, row] = source[src]
    for want, table in zip(want_tables, tables):
        want[:n, :table.shape[1]] = table
    on = [t.to(device) for t in (stage, packed, *out_tables)]
    scatter(on[0], layout, on[1], on[2:], ids_row, pend_row, None if source is None else source.to(device))
    assert torch.equal(on[1].cpu(), want_packed)
    for got, want in zip(on[2:], want_tables):
        assert torch.equal(got.cpu(), want)


@pytest.fixture
def graphs_on_cpu(monkeypatch: pytest.MonkeyPatch) -> GraphRuns:
    return record_graph_runs(monkeypatch, DecodeGraphs, "decode_graphs", lambda inputs: len(inputs.query_lens))


def test_async_scheduling_through_the_padded_path_samples_what_it_does_off(
        llama_ckpt: Path, make_engine: MakeEngine, graphs_on_cpu: GraphRuns, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode steps on the staged buffers with the in-flight ids filled in there: greedy and seeded tokens equal the
    engine's without async scheduling (whose steps carry no pending id)."""
    filled: list[int] = []
    real_scatter = scatter

    def counting(*args: object) -> None:
        filled.append(int(args[-1] is not None))
        real_scatter(*args)  # type: ignore[arg-type]

    monkeypatch.setattr("pdlaunch.runner.cuda_graphs.scatter", counting)
    prompts = mixed_prompts(7, seed=5, max_len=30)
    params = [SamplingParams(max_tokens=10, temperature=0.0 if i % 2 else 0.9, seed=i, ignore_eos=True)
              for i in range(len(prompts))]
    results = {}
    for mode in (True, False):
        engine = make_engine(llama_ckpt, max_num_seqs=4, async_scheduling=mode)
        results[mode] = tokens(run_all(engine, prompts, params))
        assert graphs_on_cpu, "no step took the padded path"
        graphs_on_cpu.clear()
    assert results[True] == results[False]
    assert any(filled), "no step filled an in-flight id on the staged buffers"
