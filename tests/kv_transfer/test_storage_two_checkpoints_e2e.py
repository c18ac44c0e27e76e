"""Two 1P1D deployments on one host with the storage connector and one `kv_transfer.storage_path` (its default,
~/.cache/pdlaunch/kv, is one per user), started at once: the tiny model, and beside it either a fine-tune of it
(same config.json, other weights) or the tiny model quantized at load (--quantization fp8). The store was keyed
by the architecture and the config only, so the other deployment's decode loaded the KV the tiny model's prefill
had stored for the same prompt and answered from it: a silently wrong completion. Now the key holds a digest of
the weights (model/weights_digest.py) and the quantization, and each answers as its own prefill does.

The three deployments (tiny, its fine-tune, tiny in fp8) start once for the module, all on the one storage path:
each case asks the tiny model first, then the other (a tiny model's deployment per case cost a 1P1D start, and the
store holding the first case's KV too only gives the second's decode more to wrongly load)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from pdlaunch.model.demo import ensure_demo_checkpoint
from tests.serving.e2e import Serve, serving

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPT = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"


def _fine_tune(directory: Path) -> Path:
    """The tiny checkpoint with every layer's matrices moved a little: same architecture, other weights."""
    shutil.copytree(ensure_demo_checkpoint(), directory)
    weights = load_file(str(directory / "model.safetensors"))
    noise = torch.Generator().manual_seed(7)
    for name, tensor in weights.items():
        if ".layers." in name and tensor.dim() == 2:
            weights[name] = tensor + 0.05 * torch.randn(tensor.shape, generator=noise, dtype=tensor.dtype)
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="module")
def deployments(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Serve]]:
    tmp = tmp_path_factory.mktemp("storage")
    config = tmp / "storage.yaml"
    config.write_text(f"kv_transfer: {{connector: storage, storage_path: {tmp / 'kv'}}}\n")
    common = [str(config), "--prefill", "1", "--decode", "1", "--num-gpu-blocks", "256", "--block-size", "8"]
    models = {"base": ["--model", "tiny"], "fine-tune": ["--model", str(_fine_tune(tmp / "tuned"))],
              "fp8": ["--model", "tiny", "--quantization", "fp8"]}
    runs: dict[str, tuple[Path, list[str]]] = {}
    for name, model in models.items():  # at once: they load side by side
        run = tmp / f"run-{name}"
        run.mkdir()
        runs[name] = (run, [*model, *common])
    with serving(runs) as started:
        yield started


@pytest.fixture(params=["fine-tune", "fp8"])
def base_and_other(request: pytest.FixtureRequest, deployments: dict[str, Serve]) -> dict[str, Serve]:
    return {"base": deployments["base"], "other": deployments[request.param]}


def _complete(url: str) -> str:
    answer = httpx.post(f"{url}/v1/completions", timeout=120,
                        json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["choices"][0]["text"])


def test_another_model_sharing_the_storage_path_never_loads_the_tiny_model_s_kv(
        base_and_other: dict[str, Serve]) -> None:
    # what each computes alone: a prefill instance answers from its own prompt pass, never from the store
    own = {name: _complete(serve.instance_urls()["prefill-0"]) for name, serve in base_and_other.items()}
    assert own["base"] != own["other"], own  # the other deployment is another model
    # The tiny model's PD answer first: its prefill stores the prompt's KV in the shared directory.
    assert _complete(base_and_other["base"].url) == own["base"]
    # The other's PD answer: its decode must not find the tiny model's KV for the same tokens.
    assert _complete(base_and_other["other"].url) == own["other"]
