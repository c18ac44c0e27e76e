"""Two 1P1D deployments on one host with the storage connector and one `kv_transfer.storage_path` (its default,
~/.cache/pdlaunch/kv, is one per user): the tiny model, and a fine-tune of it (same config.json, other weights),
started at once. The store was keyed by the architecture and the config only, so the fine-tune's decode loaded
the KV the base model's prefill had stored for the same prompt and answered from it: a silently wrong completion.
Now the key holds a digest of the weights (model/weights_digest.py) and each answers as its own prefill does."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from pdlaunch.model.demo import ensure_demo_checkpoint
from tests.serving.e2e import Serve

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


@pytest.fixture()
def base_and_tuned(tmp_path: Path) -> Iterator[dict[str, Serve]]:
    config = tmp_path / "storage.yaml"
    config.write_text(f"kv_transfer: {{connector: storage, storage_path: {tmp_path / 'kv'}}}\n")
    common = [str(config), "--prefill", "1", "--decode", "1", "--num-gpu-blocks", "256", "--block-size", "8"]
    tuned = _fine_tune(tmp_path / "tuned")
    started: dict[str, Serve] = {}
    try:
        for name, model in (("base", "tiny"), ("tuned", str(tuned))):  # at once: both load side by side
            run = tmp_path / f"run-{name}"
            run.mkdir()
            started[name] = Serve(run, ["--model", model, *common])
        for serve in started.values():
            serve.wait_ready()
        yield started
    finally:
        for serve in started.values():
            serve.stop()


def _complete(url: str) -> str:
    answer = httpx.post(f"{url}/v1/completions", timeout=120,
                        json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["choices"][0]["text"])


def test_a_fine_tune_sharing_the_storage_path_never_loads_the_base_model_s_kv(
        base_and_tuned: dict[str, Serve]) -> None:
    own = {name: _complete(serve.instance_urls()["prefill-0"]) for name, serve in base_and_tuned.items()}
    assert own["base"] != own["tuned"], own  # the fine-tune is another model
    # The base model's PD answer first: its prefill stores the prompt's KV in the shared directory.
    assert _complete(base_and_tuned["base"].url) == own["base"]
    # The fine-tune's PD answer: its decode must not find the base model's KV for the same tokens.
    assert _complete(base_and_tuned["tuned"].url) == own["tuned"]
