"""A Mistral-shaped GGUF with a SentencePiece vocabulary through the user path: check-config passes it, and
`pdlaunch generate --model FILE.gguf` (then the LLM API) gives transformers' greedy ids on the same weights
(float32, CPU), the prompt tokenized as SentencePiece tokenizes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pdlaunch.cli import app
from pdlaunch.engine.llm import LLM
from pdlaunch.engine.outputs import SamplingParams
from tests.config.cli_helpers import check
from tests.helpers.checkpoints import hf_greedy
from tests.model.gguf_files import write_gguf
from tests.model.gguf_spm_files import BOS, EOS, make_mistral_shaped, spm_tokenizer_writer, train_sentencepiece

PROMPTS = ["the quick brown fox", "Привет мир 12345 café", "  two spaces\tand a tab"]


def _until_eos(ids: list[int]) -> list[int]:
    return ids[:ids.index(EOS) + 1] if EOS in ids else ids


@pytest.mark.slow
def test_mistral_shaped_spm_gguf_generates_what_transformers_generates(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDLAUNCH_CACHE_DIR", str(tmp_path / "cache"))
    sp = train_sentencepiece()
    hf_dir = make_mistral_shaped(tmp_path / "hf", sp.get_piece_size())
    path = write_gguf(hf_dir, tmp_path / "mistral.gguf", "llama", add_tokenizer=spm_tokenizer_writer(sp))
    checked = check(["--model", str(path), "--device", "cpu"])
    assert checked.exit_code == 0, checked.output
    out = CliRunner().invoke(app, ["generate", "--model", str(path), "--prompt", PROMPTS[0], "--max-tokens", "12",
                                   "--device", "cpu", "--dtype", "float32", "--json"])
    assert out.exit_code == 0, out.output
    ours = json.loads(out.output.strip().splitlines()[-1])["token_ids"]
    prompts = [[BOS, *sp.encode(p)] for p in PROMPTS]
    assert ours == _until_eos(hf_greedy(hf_dir, prompts[0], 12))  # F32 file: the very same weights
    with LLM(str(path), device="cpu", dtype="float32", num_gpu_blocks=64) as llm:
        assert llm.tokenizer.encode(PROMPTS[2]) == prompts[2]
        outs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    for prompt, got in zip(prompts, outs):
        assert list(got.token_ids) == hf_greedy(hf_dir, prompt, 16)
