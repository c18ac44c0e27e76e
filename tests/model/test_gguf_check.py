"""check-config validates a GGUF file like a checkpoint directory: every tensor the architecture needs,
with the shape its metadata implies, a tokenizer that builds, and quant types we can dequantize. Each
problem is one `--model` line with a fix; serve and the conversion refuse the file with the same words."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import Result

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.gguf.convert import convert_gguf
from tests.config.cli_helpers import assert_invalid, check, invoke
from tests.helpers.checkpoints import make_llama, make_qwen3
from tests.model.gguf_files import write_gguf

CPU = ["--device", "cpu"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama(tmp_path_factory.mktemp("hf") / "llama", rope_scaling_llama3=False)


def _check(path: Path) -> Result:
    return check(["--model", str(path), *CPU])


def _errors(result: Result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error: ")]


def test_an_intact_file_is_valid(llama_dir: Path, tmp_path: Path) -> None:
    result = _check(write_gguf(llama_dir, tmp_path / "m.gguf", "llama", quant="Q8_0"))
    assert result.exit_code == 0, result.output


def test_missing_tensor_is_named(llama_dir: Path, tmp_path: Path) -> None:
    path = write_gguf(llama_dir, tmp_path / "m.gguf", "llama",
                      edit=lambda name, v: None if name == "blk.1.ffn_down.weight" else v)
    result = _check(path)
    assert_invalid(result, "--model", "GGUF file lacks tensor(s) blk.1.ffn_down.weight that a 2-layer llama model")
    assert "re-download or re-convert" in result.output
    with pytest.raises(PdlaunchError, match="lacks tensor"):  # refused before any weight is dequantized
        convert_gguf(path, tmp_path)


def test_wrong_shape_names_tensor_both_shapes_and_the_metadata(llama_dir: Path, tmp_path: Path) -> None:
    path = write_gguf(llama_dir, tmp_path / "m.gguf", "llama",
                      edit=lambda name, v: v[:16] if name == "blk.0.attn_k.weight" else v)
    result = _check(path)
    assert_invalid(result, "--model", "GGUF tensor 'blk.0.attn_k.weight' has shape (16, 64), the metadata "
                   "(llama.attention.head_count_kv x llama.attention.key_length, llama.embedding_length) "
                   "implies (32, 64)")
    served = invoke(["serve", "--model", str(path), *CPU, "--port", "1"])
    assert served.exit_code == 1 and set(_errors(served)) == set(_errors(result)), served.output


def test_a_context_length_of_0_is_named(tmp_path: Path) -> None:
    """llama.context_length 0 (the model's max_position_embeddings) passed the GGUF checks: check-config said
    "config.json has no max_position_embeddings", and the load named a config.json the user has not got."""
    hf_dir = make_llama(tmp_path / "hf", rope_scaling_llama3=False)
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 0}))
    path = write_gguf(hf_dir, tmp_path / "m.gguf", "llama")
    result = _check(path)
    assert_invalid(result, "--model", "GGUF metadata llama.context_length is 0; a model's context is at least 1")
    assert len(_errors(result)) == 1 and "config.json" not in result.output, result.output
    generated = invoke(["generate", str(path), *CPU, "--prompt", "hi", "--max-tokens", "1"])
    assert generated.exit_code == 1 and "llama.context_length is 0" in generated.output, generated.output


def test_no_tokenizer_in_the_metadata(llama_dir: Path, tmp_path: Path) -> None:
    result = _check(write_gguf(llama_dir, tmp_path / "m.gguf", "llama", tokenizer=False))
    assert_invalid(result, "--model", "GGUF metadata holds no tokenizer (tokenizer.ggml.model and "
                   "tokenizer.ggml.tokens)")
    assert "embeds its tokenizer" in result.output


@pytest.mark.parametrize(("header", "said"), [
    # the magic and version, then nothing: gguf's words were Python's, "not enough values to unpack ..."
    (b"GGUF\x03\x00\x00\x00", "is not a readable GGUF file: its header does not parse ("),
    (b"garbage\n", "is not a readable GGUF file: GGUF magic invalid"),
    # a header of no tensors and no metadata: "GGUF architecture None is not supported"
    (b"GGUF\x03\x00\x00\x00" + b"\x00" * 16, "the GGUF file names no architecture (general.architecture)"),
], ids=["cut-after-the-version", "no-magic", "no-metadata"])
def test_a_damaged_file_says_what_is_wrong_with_it(tmp_path: Path, header: bytes, said: str) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(header)
    result = _check(path)
    assert_invalid(result, "--model", said)
    [error] = _errors(result)
    assert "re-download" in error and "None" not in error, error


def test_unreadable_quant_type_is_named(llama_dir: Path, tmp_path: Path) -> None:
    path = write_gguf(llama_dir, tmp_path / "m.gguf", "llama", raw_types={"blk.0.ffn_up.weight": "Q8_1"})
    result = _check(path)
    assert_invalid(result, "--model", "quantization types the installed gguf package cannot dequantize: Q8_1")
    assert "pip install -U gguf" in result.output and len(_errors(result)) == 1, result.output


def test_unexpected_tensor_and_a_capped_list(llama_dir: Path, tmp_path: Path) -> None:
    def junk(name: str, values: np.ndarray) -> np.ndarray:
        return values[:, :8] if values.ndim == 2 else values  # every matrix too narrow: many problems

    errors = _errors(_check(write_gguf(llama_dir, tmp_path / "m.gguf", "llama", edit=junk)))
    assert 2 <= len(errors) <= 7 and any("more GGUF tensor problem" in line for line in errors), errors
    extra = write_gguf(llama_dir, tmp_path / "x.gguf", "llama", extra={"blk.0.mystery.weight": np.ones(4, np.float32)})
    assert_invalid(_check(extra), "--model", "GGUF tensor 'blk.0.mystery.weight' has no place in a llama model")


def test_qwen3_needs_its_q_and_k_norms(tmp_path: Path) -> None:
    hf_dir = make_qwen3(tmp_path / "hf")
    assert _check(write_gguf(hf_dir, tmp_path / "ok.gguf", "qwen3")).exit_code == 0
    path = write_gguf(hf_dir, tmp_path / "m.gguf", "qwen3",
                      edit=lambda name, v: None if name.endswith("attn_k_norm.weight") else v)
    assert_invalid(_check(path), "--model", "lacks tensor(s) blk.0.attn_k_norm.weight, blk.1.attn_k_norm.weight")


def test_without_the_gguf_package_the_error_says_how_to_get_it(llama_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_gguf(llama_dir, tmp_path / "m.gguf", "llama")
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now fails as on a host without it
    assert_invalid(_check(path), "--model", "reading m.gguf needs the gguf package, which is not installed")


@pytest.mark.parametrize("with_config", [False, True])
@pytest.mark.parametrize("command", ["check-config", "generate"])
def test_a_directory_holding_a_gguf_file_names_the_file_to_pass(llama_dir: Path, tmp_path: Path, command: str,
                                                                 with_config: bool) -> None:
    """A GGUF repository downloaded into a folder (with or without the original config.json) was refused as a
    checkpoint directory lacking config.json or safetensors ("convert .bin/.pt weights"), never saying that
    pdlaunch serves the .gguf file it holds."""
    folder = tmp_path / "gguf-repo"
    folder.mkdir()
    gguf = write_gguf(llama_dir, folder / "model-Q8_0.gguf", "llama", quant="Q8_0")
    if with_config:
        (folder / "config.json").write_text((llama_dir / "config.json").read_text())
        (folder / "tokenizer.json").write_text((llama_dir / "tokenizer.json").read_text())
    extra = ["--prompt", "hi", "--max-tokens", "1"] if command == "generate" else []
    result = invoke([command, "--model", str(folder), *CPU, *extra])
    assert result.exit_code == 1, result.output
    said = " ".join(result.output.split())
    assert f"the directory holds model-Q8_0.gguf: pass the .gguf file itself, --model {gguf}" in said
    assert ".bin/.pt" not in said


@pytest.mark.parametrize(("method", "written", "said"), [
    # a ZeroDivisionError traceback (hidden_size // head_count) in check-config, serve and the conversion
    ("add_head_count", 0, "GGUF metadata llama.attention.head_count is 0, not a positive integer"),
    # a per-layer list (llama.cpp writes one for models whose layers differ): int() of a list, a TypeError
    ("add_head_count_kv", [2, 2], "GGUF metadata llama.attention.head_count_kv is [2, 2] (one value per layer"),
    # passed the GGUF checks; the converted checkpoint was then refused naming a config.json the user never wrote
    ("add_layer_norm_rms_eps", -1.0, "GGUF metadata llama.attention.layer_norm_rms_epsilon is -1.0, not a positive"),
    ("add_rope_freq_base", 0.0, "GGUF metadata llama.rope.freq_base is 0.0, not a positive number"),
    ("add_block_count", 0, "GGUF metadata llama.block_count is 0, not a positive integer"),
], ids=["head_count-0", "head_count_kv-per-layer", "rms_epsilon-negative", "freq_base-0", "block_count-0"])
def test_a_metadata_size_that_is_not_one_is_named(llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   method: str, written: object, said: str) -> None:
    import gguf

    writer = getattr(gguf.GGUFWriter, method)
    monkeypatch.setattr(gguf.GGUFWriter, method, lambda self, _value: writer(self, written))
    path = write_gguf(llama_dir, tmp_path / "m.gguf", "llama")
    result = _check(path)
    assert_invalid(result, "--model", said)
    assert len(_errors(result)) == 1 and "config.json" not in result.output, result.output
    with pytest.raises(PdlaunchError, match=re.escape(said)):  # refused before any weight is dequantized
        convert_gguf(path, tmp_path)


def test_kv_heads_that_do_not_divide_the_heads_are_named_as_metadata(tmp_path: Path) -> None:
    """head_count 4 over head_count_kv 3, with tensors of those shapes: the file's checks passed, and the load refused
    the converted checkpoint naming config.json's num_key_value_heads, a file the user never wrote."""
    hf_dir = make_llama(tmp_path / "hf", rope_scaling_llama3=False)
    config = json.loads((hf_dir / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    import gguf

    writer = gguf.GGUFWriter.add_head_count_kv
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf.GGUFWriter, "add_head_count_kv", lambda self, _value: writer(self, 3))
        path = write_gguf(hf_dir, tmp_path / "m.gguf", "llama", edit=lambda name, v: np.concatenate(
            [v, v[: v.shape[0] // 2]]) if name.endswith(("attn_k.weight", "attn_v.weight")) else v)
    result = _check(path)
    assert_invalid(result, "--model", "GGUF metadata llama.attention.head_count 4 is not a multiple of "
                   "llama.attention.head_count_kv 3")
    assert len(_errors(result)) == 1 and "config.json" not in result.output, result.output


@pytest.mark.parametrize("method", ["add_bos_token_id", "add_eos_token_id"])
def test_a_bos_or_eos_outside_a_byte_level_vocabulary_is_named(llama_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """A byte-level BPE (gpt2) vocabulary's BOS or EOS id past its tokens passed check-config: the converted
    checkpoint then had every request refused (the BOS put before each prompt lies outside the embedding) or no answer
    stop at its EOS (an id never sampled). SentencePiece vocabularies were already refused so."""
    import gguf

    writer = getattr(gguf.GGUFWriter, method)
    monkeypatch.setattr(gguf.GGUFWriter, method, lambda self, _value: writer(self, 100000))
    path = write_gguf(llama_dir, tmp_path / "m.gguf", "llama")
    key = method.removeprefix("add_")
    said = f"GGUF tokenizer.ggml.{key} is 100000, outside the 512-token vocabulary"
    result = _check(path)
    assert_invalid(result, "--model", said)
    assert len(_errors(result)) == 1, result.output
    with pytest.raises(PdlaunchError, match=said):
        convert_gguf(path, tmp_path)


def test_a_token_type_list_shorter_than_the_vocabulary_is_named(llama_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A byte-level BPE file whose tokenizer.ggml.token_type list was shorter than its tokens converted silently: the
    pairing cut at the shorter list, so the special tokens past it were split as text (llama.cpp reads past the list's
    end). SentencePiece vocabularies were already refused so."""
    import gguf

    writer = gguf.GGUFWriter.add_token_types
    monkeypatch.setattr(gguf.GGUFWriter, "add_token_types", lambda self, types: writer(self, list(types)[:-3]))
    path = write_gguf(llama_dir, tmp_path / "m.gguf", "llama")
    said = "GGUF tokenizer.ggml.token_type has 509 entries for 512 tokens"
    result = _check(path)
    assert_invalid(result, "--model", said)
    assert len(_errors(result)) == 1, result.output
    with pytest.raises(PdlaunchError, match=said):
        convert_gguf(path, tmp_path)


@pytest.mark.parametrize("factor", [-2.0, float("nan")])
def test_a_linear_rope_factor_that_is_not_positive_is_named(llama_dir: Path, tmp_path: Path,
                                                            factor: float) -> None:
    """rope.scaling.type linear with a negative or NaN factor became config.json's rope factor as it was: the
    converted model's positions were scaled by it (every answer garbage) with nothing said. An absent factor stays
    plain rope, as llama.cpp reads it (a scale of 1)."""
    def add_linear(writer: object) -> None:
        writer.add_rope_scaling_type(__import__("gguf").RopeScalingType.LINEAR)  # type: ignore[attr-defined]
        writer.add_rope_scaling_factor(factor)  # type: ignore[attr-defined]

    path = write_gguf(llama_dir, tmp_path / "m.gguf", "llama", extra_metadata=add_linear)
    said = f"GGUF metadata llama.rope.scaling.factor is {factor!r}, not a positive number"
    result = _check(path)
    assert_invalid(result, "--model", said)
    assert len(_errors(result)) == 1, result.output


def test_a_linear_rope_without_a_factor_is_plain(llama_dir: Path, tmp_path: Path) -> None:
    def add_linear(writer: object) -> None:
        writer.add_rope_scaling_type(__import__("gguf").RopeScalingType.LINEAR)  # type: ignore[attr-defined]

    path = write_gguf(llama_dir, tmp_path / "m.gguf", "llama", extra_metadata=add_linear)
    out = tmp_path / "converted"
    out.mkdir()
    convert_gguf(path, out)
    rope = json.loads((out / "config.json").read_text())["rope_parameters"]
    assert rope["rope_type"] == "default", rope
