"""GGUF checkpoints: a file written the way llama.cpp's converter writes one (q/k rows permuted, byte-level
BPE vocabulary in the metadata) converts back into a checkpoint that generates what transformers generates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pdlaunch.engine.llm import LLM
from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.errors import PdlaunchError
from pdlaunch.model.gguf.convert import convert_gguf, ensure_converted
from pdlaunch.model.tokenizer import Tokenizer
from tests.helpers.checkpoints import hf_greedy, make_llama, make_qwen2
from tests.model.gguf_files import gguf, write_gguf


def _greedy(model_dir: Path, prompt_ids: list[int], n: int) -> list[int]:
    with LLM(str(model_dir), device="cpu", num_gpu_blocks=64) as llm:
        out = llm.generate([prompt_ids], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    return list(out[0].token_ids)


@pytest.mark.parametrize("arch,make", [("llama", lambda d: make_llama(d, rope_scaling_llama3=False)),
                                       ("qwen2", make_qwen2)])
def test_f32_gguf_generates_what_transformers_generates(tmp_path: Path, arch: str, make) -> None:
    hf_dir = make(tmp_path / "hf")
    out = tmp_path / "conv"
    out.mkdir()
    convert_gguf(write_gguf(hf_dir, tmp_path / "m.gguf", arch), out)
    prompt = Tokenizer(hf_dir).encode("the quick brown fox")
    assert Tokenizer(out).encode("the quick brown fox") == prompt  # tokenizer rebuilt from GGUF metadata
    assert _greedy(out, prompt, 12) == hf_greedy(hf_dir, prompt, 12)


def test_quantized_weights_dequantize_close_to_the_originals(tmp_path: Path) -> None:
    hf_dir = make_llama(tmp_path / "hf", rope_scaling_llama3=False)
    out = tmp_path / "conv"
    out.mkdir()
    convert_gguf(write_gguf(hf_dir, tmp_path / "m.gguf", "llama", quant="Q8_0"), out)
    original, converted = load_file(str(hf_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(original) == set(converted)
    for name, tensor in original.items():
        err = (converted[name] - tensor).abs().max().item()
        assert err <= 0.01 * tensor.abs().max().item() + 1e-6, (name, err)  # Q8_0: 1/127 of a block's range


def test_cached_conversion_is_reused_and_redone_when_the_file_changes(tmp_path: Path) -> None:
    hf_dir = make_qwen2(tmp_path / "hf")
    path = write_gguf(hf_dir, tmp_path / "m.gguf", "qwen2")
    first = ensure_converted(path, tmp_path / "cache")
    assert ensure_converted(path, tmp_path / "cache") == first
    write_gguf(hf_dir, path, "qwen2", quant="Q8_0")
    assert ensure_converted(path, tmp_path / "cache") != first


def test_broken_and_unsupported_files_name_model_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(PdlaunchError) as err:
        convert_gguf(bad, tmp_path)
    assert err.value.field == "model.path" and "not a readable GGUF file" in err.value.message
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(PdlaunchError, match="architecture 'gpt2' is not supported"):
        convert_gguf(tmp_path / "gpt2.gguf", tmp_path)


def test_rope_dtype_and_tied_embeddings_in_the_written_config(tmp_path: Path) -> None:
    hf_dir = make_qwen2(tmp_path / "hf", tie=True)
    out = tmp_path / "conv"
    out.mkdir()
    convert_gguf(write_gguf(hf_dir, tmp_path / "m.gguf", "qwen2"), out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and "lm_head.weight" not in load_file(str(out / "model.safetensors"))
    assert cfg["rope_parameters"]["rope_theta"] == 1000000.0 and cfg["attention_bias"] is True
    assert torch.float32 == getattr(torch, cfg["dtype"])


def test_check_config_and_generate_take_a_gguf_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user path: `pdlaunch check-config --model FILE.gguf`, then `pdlaunch generate --model FILE.gguf`."""
    from typer.testing import CliRunner

    from pdlaunch.cli import app

    monkeypatch.setenv("PDLAUNCH_CACHE_DIR", str(tmp_path / "cache"))
    hf_dir = make_llama(tmp_path / "hf", rope_scaling_llama3=False)
    path = write_gguf(hf_dir, tmp_path / "m.gguf", "llama")
    runner = CliRunner()
    checked = runner.invoke(app, ["check-config", "--model", str(path), "--device", "cpu"])
    assert checked.exit_code == 0, checked.output
    prompt = Tokenizer(hf_dir).encode("the quick brown fox")
    out = runner.invoke(app, ["generate", "--model", str(path), "--prompt", "the quick brown fox", "--max-tokens", "8",
                              "--json"])
    assert out.exit_code == 0, out.output
    ours = json.loads(out.output.strip().splitlines()[-1])["token_ids"]
    assert ours == hf_greedy(hf_dir, prompt, 8, stop_at_eos=True)


def test_check_config_names_a_broken_gguf_file(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pdlaunch.cli import app

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF but not really")
    result = CliRunner().invoke(app, ["check-config", "--model", str(bad), "--device", "cpu"])
    assert result.exit_code == 1
    assert "not a readable GGUF file" in result.output and "Traceback" not in result.output
