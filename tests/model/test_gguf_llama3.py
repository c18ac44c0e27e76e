"""Llama 3.1/3.2 GGUF files store llama3 rope scaling as `rope_freqs` (one divisor per rotary frequency, as
llama.cpp's converter writes it). The conversion recovers transformers' llama3 rope_parameters from it,
so the converted checkpoint's rotary is transformers' and greedy ids equal transformers' (CPU, float32)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pdlaunch.cli import app
from pdlaunch.engine.llm import LLM
from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.model.arch import load_arch
from pdlaunch.model.gguf.convert import convert_gguf
from pdlaunch.model.rotary import compute_inv_freq
from pdlaunch.model.tokenizer import Tokenizer
from tests.config.cli_helpers import assert_invalid, check
from tests.helpers.checkpoints import hf_greedy, make_llama, make_llama32
from tests.model.gguf_files import write_gguf

PROMPTS = ["the quick brown fox", "one two three four five six seven eight nine ten"]


@pytest.fixture(scope="module")
def llama32_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama32(tmp_path_factory.mktemp("hf") / "llama32")


def _rope(directory: Path) -> dict[str, object]:
    return dict(json.loads((directory / "config.json").read_text())["rope_parameters"])


def _transformers_inv_freq(directory: Path) -> torch.Tensor:
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](AutoConfig.from_pretrained(directory), "cpu")
    return inv_freq.float()


@pytest.mark.parametrize("rope_metadata", [False, True])
def test_rope_freqs_give_back_the_llama3_parameters(llama32_dir: Path, tmp_path: Path, rope_metadata: bool) -> None:
    """From rope_freqs alone (llama.cpp's converter) or with rope.scaling.* metadata: the same parameters."""
    out = tmp_path / "conv"
    out.mkdir()
    convert_gguf(write_gguf(llama32_dir, tmp_path / "m.gguf", "llama", rope_metadata=rope_metadata), out)
    assert _rope(out) == _rope(llama32_dir)
    assert _rope(out)["original_max_position_embeddings"] == 8192  # an int, as config.json holds it
    arch = load_arch(out)
    ours = compute_inv_freq(arch.head_dim, arch.rope_theta, arch.rope_scaling, arch.max_position_embeddings)
    torch.testing.assert_close(ours, _transformers_inv_freq(llama32_dir), rtol=0, atol=0)
    torch.testing.assert_close(_transformers_inv_freq(out), _transformers_inv_freq(llama32_dir), rtol=0, atol=0)


def test_llama32_gguf_generates_what_transformers_generates(llama32_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The user path: `pdlaunch check-config` and `pdlaunch generate --model FILE.gguf`, then the LLM API."""
    monkeypatch.setenv("PDLAUNCH_CACHE_DIR", str(tmp_path / "cache"))
    path = write_gguf(llama32_dir, tmp_path / "llama32.gguf", "llama", quant="F16")
    checked = check(["--model", str(path), "--device", "cpu"])
    assert checked.exit_code == 0, checked.output
    tokenizer = Tokenizer(llama32_dir)
    out = CliRunner().invoke(app, ["generate", "--model", str(path), "--prompt", PROMPTS[0], "--max-tokens", "12",
                                   "--device", "cpu", "--dtype", "float32", "--json"])
    assert out.exit_code == 0, out.output
    ours = json.loads(out.output.strip().splitlines()[-1])["token_ids"]
    # F16 weights in the file: transformers runs the same rounded weights (converted dir), in float32
    converted = next((tmp_path / "cache" / "gguf").iterdir())
    assert ours == hf_greedy(converted, tokenizer.encode(PROMPTS[0]), 12, stop_at_eos=True)
    assert _rope(converted) == _rope(llama32_dir)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    with LLM(str(path), device="cpu", dtype="float32", num_gpu_blocks=64) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    for prompt, got in zip(prompts, outs):
        assert list(got.token_ids) == hf_greedy(converted, prompt, 16)


def test_small_context_llama3_gguf_matches_the_original_checkpoint(tmp_path: Path) -> None:
    """original_max_position_embeddings 64 puts every regime at head_dim 16, so a wrong rotary changes the ids:
    the F32 file's engine output equals transformers on the original HF checkpoint."""
    hf_dir = make_llama(tmp_path / "hf")  # llama3 rope, factor 8, old context 64
    out = tmp_path / "conv"
    out.mkdir()
    convert_gguf(write_gguf(hf_dir, tmp_path / "m.gguf", "llama"), out)
    assert _rope(out) == _rope(hf_dir)
    prompt = Tokenizer(hf_dir).encode(" ".join(["alpha beta gamma delta"] * 12))  # positions past 64
    with LLM(str(out), device="cpu", dtype="float32", num_gpu_blocks=64) as llm:
        got = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    assert list(got[0].token_ids) == hf_greedy(hf_dir, prompt, 16)


def test_rope_freqs_that_are_not_llama3_are_refused(llama32_dir: Path, tmp_path: Path) -> None:
    def scramble(name: str, values: np.ndarray) -> np.ndarray:
        return np.linspace(1.0, 32.0, values.size, dtype=np.float32) if name == "rope_freqs.weight" else values

    path = write_gguf(llama32_dir, tmp_path / "m.gguf", "llama", edit=scramble)
    assert_invalid(check(["--model", str(path), "--device", "cpu"]), "--model",
                   "GGUF tensor rope_freqs does not follow llama3 rope scaling")
