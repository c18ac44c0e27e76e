"""An FP8 weight-only compressed-tensors checkpoint (a config group without input_activations, W8A16) on the GPU.

pdlaunch computes it as it computes FP8-Dynamic: FP8 GEMMs whose activations are quantized per token at run time
(model/quant/config.py says why), so the same weights decode the same tokens and logprobs whether the checkpoint
declares dynamic per-token activations or none."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdlaunch.engine.outputs import SamplingParams
from tests.engine.conftest import MakeEngine
from tests.helpers.fp8_checkpoints import make_fp8_qwen3, weight_only_copy

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                 reason="needs a CUDA GPU with FP8 tensor cores (run `make test-gpu` on one)")]


@pytest.mark.parametrize("scheme", ["channel", "tensor"])
def test_weight_only_checkpoint_decodes_as_its_fp8_dynamic_twin(scheme: str, tmp_path: Path,
                                                                make_engine: MakeEngine) -> None:
    from tests.engine.test_engine_parity import random_prompts

    dynamic, _ = make_fp8_qwen3(tmp_path, scheme)
    weight_only = weight_only_copy(dynamic, tmp_path)
    prompts = random_prompts([5, 21, 9, 14], seed=3)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2)

    def run(path: Path) -> dict[str, list[tuple[int, float]]]:
        engine = make_engine(path, device="cuda", dtype="bfloat16")
        fp8_weights = [m for m in engine.executor.runner.model.modules() if getattr(m, "weight", None) is not None
                       and m.weight.dtype == torch.float8_e4m3fn]
        assert fp8_weights, f"{path.name}: no projection kept its FP8 weights on the GPU"
        for i, prompt in enumerate(prompts):
            engine.add_request(f"p{i}", prompt, params)
        steps: dict[str, list[tuple[int, float]]] = {f"p{i}": [] for i in range(len(prompts))}
        while engine.has_unfinished_requests():
            for out in engine.step():
                steps[out.request_id] += [(lp.token_id, lp.logprob) for lp in out.new_logprobs or []]
        assert all(len(tokens) == params.max_tokens for tokens in steps.values()), steps
        return steps

    assert run(weight_only) == run(dynamic)
