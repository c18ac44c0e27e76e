"""Prompt logprobs in the engine (engine/prompt_logprobs.py), CPU and CUDA: equal to transformers'
log-softmax at every prompt position under chunked prefill, batched with requests that do not ask
(whose tokens do not change and who get none), delivered once with the first output."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.engine.outputs import RequestOutput, SamplingParams
from tests.engine.conftest import MakeEngine
from tests.helpers.checkpoints import hf_logits, make_llama

PROMPT = [(11 * i + 5) % 500 + 3 for i in range(37)]
OTHER = [(13 * i + 1) % 500 + 3 for i in range(29)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama(tmp_path_factory.mktemp("plp-engine-llama"), seed=21)


def _run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[RequestOutput]]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    outputs: dict[str, list[RequestOutput]] = {rid: [] for rid in requests}
    for _ in range(1000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            outputs[out.request_id].append(out)
    return outputs


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_prompt_logprobs_equal_transformers_under_chunked_prefill(make_engine: MakeEngine, checkpoint: Path,
                                                                  device: str) -> None:
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    alone = _run(make_engine(checkpoint, device=device, max_num_batched_tokens=16), {"b": (OTHER, greedy)})
    engine = make_engine(checkpoint, device=device, max_num_batched_tokens=16)
    asking = greedy.model_copy(update={"prompt_logprobs": 4})
    outputs = _run(engine, {"a": (PROMPT, asking), "b": (OTHER, greedy)})
    delivered = [o.prompt_logprobs for o in outputs["a"] if o.prompt_logprobs is not None]
    assert len(delivered) == 1 and outputs["a"][0].prompt_logprobs is delivered[0]
    assert all(o.prompt_logprobs is None for o in outputs["b"])
    assert outputs["b"][-1].output_token_ids == alone["b"][-1].output_token_ids
    expected = hf_logits(checkpoint, PROMPT).log_softmax(dim=-1)
    got = delivered[0]
    assert len(got) == len(PROMPT) and got[0] is None
    for p in range(1, len(PROMPT)):
        row, entry = expected[p - 1], got[p]
        assert entry is not None and entry.token_id == PROMPT[p]
        assert entry.logprob == pytest.approx(row[PROMPT[p]].item(), abs=1e-4)
        assert entry.rank == int((row > row[PROMPT[p]]).sum()) + 1
        values, ids = row.topk(4)
        assert list(entry.top) == ids.tolist()
        assert torch.allclose(torch.tensor(list(entry.top.values())), values, atol=1e-4)


def test_prompt_logprobs_of_non_finite_logits_are_the_floor_not_inf_or_nan() -> None:
    """A prompt row whose logits hold -inf (a token the model rules out) or NaN (an overflowed forward) gave a -inf or
    NaN logprob, which JSON cannot carry: the server's answer failed with a 500. They are reported as the sampler's
    own logprobs are, LOGPROB_FLOOR (vLLM's -9999.0), in the values, the top alternatives and the ranks' comparison."""
    from pdlaunch.engine.sampler import LOGPROB_FLOOR
    from pdlaunch.runner.prompt_logprobs import PromptRows, compute

    logits = torch.tensor([[2.0, float("-inf"), 0.0, 1.0], [float("nan"), 0.0, 1.0, 2.0], [0.0, 1.0, 2.0, 3.0]])
    out = compute(lambda h: h, logits, PromptRows(rows=[0, 1, 2], targets=[1, 2, 3], top_k=4))
    values = out.logprobs + [v for top in out.top_values for v in top]
    assert all(math.isfinite(v) for v in values), values
    assert out.logprobs[0] == LOGPROB_FLOOR and out.ranks[0] == 4  # below every finite token
    assert out.top_values[0][-1] == LOGPROB_FLOOR and out.top_ids[0][:3] == [0, 3, 2]
    assert out.logprobs[1] == LOGPROB_FLOOR  # a NaN row has no distribution: every token at the floor
    assert math.isclose(out.logprobs[2], torch.tensor([0.0, 1.0, 2.0, 3.0]).log_softmax(0)[3].item(), rel_tol=1e-6)
    assert out.ranks[2] == 1
