"""Prompt logprobs in the engine (engine/prompt_logprobs.py), CPU and CUDA: equal to transformers'
log-softmax at every prompt position under chunked prefill, batched with requests that do not ask
(whose tokens do not change and who get none), delivered once with the first output."""

from __future__ import annotations

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
