"""CUDA, Qwen3 and the Llama 3.2 shape: float32 greedy == transformers with the fused kernels and
the Triton decode kernel (and with the torch gather path), Triton decode == gather step by step,
CUDA-graph replay == eager and == transformers, bf16 greedy agreement over 32 tokens (reported)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.model.checkpoint import load_checkpoint
from pdlaunch.model.loader import load_model
from pdlaunch.model.triton_decode import paged_decode_available
from tests.engine.conftest import MakeEngine, make_engine, run_all  # noqa: F401  (pytest fixture)
from tests.helpers.checkpoints import hf_greedy
from tests.helpers.graphs import counting_replays
from tests.model.paged_runner import PagedRunner
from tests.model.test_parity import PROMPT

pytestmark = pytest.mark.gpu

KINDS = ["qwen3_ckpt", "qwen3_tied_ckpt", "llama32_ckpt"]
CUDA = torch.device("cuda")


def _model(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    return load_model(load_checkpoint(str(path)), CUDA, dtype)


def _prompts(lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in lengths]


@pytest.fixture(autouse=True)
def _no_tf32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_float32_greedy_matches_transformers(kind: str, backend: str, request: pytest.FixtureRequest,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDLAUNCH_PAGED_DECODE", "auto" if backend == "triton" else "torch")
    path = request.getfixturevalue(kind)
    runner = PagedRunner(_model(path, torch.float32), block_size=4)
    assert paged_decode_available(runner.kv_caches[0]) == (backend == "triton")
    assert runner.greedy(PROMPT, 16, chunk=7) == hf_greedy(path, PROMPT, 16, device="cuda")


@pytest.mark.parametrize("kind", KINDS)
def test_cuda_triton_decode_equals_torch_gather(kind: str, request: pytest.FixtureRequest,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(request.getfixturevalue(kind), torch.float32)
    prompts = {"a": PROMPT, "b": PROMPT[:5], "c": [507] + list(range(100, 140))}
    results = {}
    for backend in ("auto", "torch"):
        monkeypatch.setenv("PDLAUNCH_PAGED_DECODE", backend)
        runner = PagedRunner(model, block_size=8)
        runner.step(prompts)
        steps = [runner.step({s: [300 + i] for s in prompts}) for i in range(6)]
        results[backend] = torch.stack([torch.cat([out[s] for s in "abc"]) for out in steps])
    torch.testing.assert_close(results["auto"], results["torch"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_cuda_graph_replay_equals_eager_and_transformers(kind: str, request: pytest.FixtureRequest,
                                                         make_engine: MakeEngine) -> None:  # noqa: F811
    path = request.getfixturevalue(kind)
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    batch = _prompts([5, 40, 1, 23, 9], seed=7)
    graphed = make_engine(path, device="cuda", max_num_seqs=8)
    assert graphed.runner.graphs is not None and graphed.runner.graphs.graphs
    with counting_replays() as replays:
        got = [o.output_token_ids for o in run_all(graphed, batch, greedy)]
    assert replays[0] >= greedy.max_tokens - 1
    eager = make_engine(path, device="cuda", max_num_seqs=8, enforce_eager=True)
    assert [o.output_token_ids for o in run_all(eager, batch, greedy)] == got
    assert got == [hf_greedy(path, p, greedy.max_tokens, device="cuda") for p in batch]


@pytest.mark.parametrize("kind", KINDS)
def test_cuda_bfloat16_greedy_agreement_over_32_tokens(kind: str, request: pytest.FixtureRequest,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """bf16 rounds differently from transformers' bf16 in places (fused kernels, paged attention),
    so long greedy runs may part on a near-tie: reports how many of 6 prompts agree for 32 tokens
    and where the others first differ, and requires most to agree."""
    path = request.getfixturevalue(kind)
    model = _model(path, torch.bfloat16)
    prompts = _prompts([4, 9, 17, 21, 33, 50], seed=5)
    divergence: list[int | None] = []
    for prompt in prompts:
        ours = PagedRunner(model, block_size=16).greedy(prompt, 32)
        theirs = hf_greedy(path, prompt, 32, dtype=torch.bfloat16, device="cuda")
        divergence.append(next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None))
    matched = sum(d is None for d in divergence)
    with capsys.disabled():
        print(f"\n{kind} bf16: {matched} of {len(prompts)} prompts match transformers for 32 tokens; "
              f"first divergence per prompt: {divergence}")
    assert matched >= len(prompts) // 2, divergence
