"""check-config opens what serve opens: broken weights, shapes and tokenizer files are reported by
check-config, and serve refuses them with the same line before it starts any process."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from click.testing import Result
from safetensors.torch import load_file, save_file

from tests.config.cli_helpers import assert_invalid, check, invoke, write_model

CPU = ["--device", "cpu"]


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "ckpt"))


def _check(model: Path) -> Result:
    return check(["--model", str(model), *CPU])


def _errors(result: Result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error: ")]


def _serve_fails_the_same_way(model: Path, checked: Result) -> None:
    served = invoke(["serve", "--model", str(model), *CPU, "--port", "1"])
    assert served.exit_code == 1, served.output
    assert set(_errors(served)) == set(_errors(checked)), served.output
    assert "ready" not in served.output


@pytest.mark.parametrize("name", ["llama_ckpt", "qwen2_ckpt", "mistral_ckpt", "hybrid_ckpt", "sharded_ckpt"])
def test_real_checkpoints_are_valid(name: str, request: pytest.FixtureRequest) -> None:
    result = _check(request.getfixturevalue(name))
    assert result.exit_code == 0, result.output


def _corrupt_header(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[8:40] = b"#" * 32
    file.write_bytes(bytes(data))


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:-100])


def _empty(file: Path) -> None:
    file.write_bytes(b"")


def _huge_header_length(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])


@pytest.mark.parametrize(("damage", "text"), [
    (_corrupt_header, "not valid JSON"),
    (_truncate, "truncated"),
    (_empty, "empty"),
    (_huge_header_length, "header larger than"),
])
def test_broken_safetensors_file(llama_ckpt: Path, tmp_path: Path, damage: object, text: str) -> None:
    model = _copy(llama_ckpt, tmp_path)
    damage(model / "model.safetensors")  # type: ignore[operator]
    result = _check(model)
    assert_invalid(result, "--model", text)
    assert "model.safetensors" in result.output and "re-download" in result.output
    _serve_fails_the_same_way(model, result)


def _with_header_metadata(src: Path, dst: Path, metadata: object) -> Path:
    """A copy of checkpoint `src` whose model.safetensors header holds `metadata` as its __metadata__ (valid JSON,
    offsets and sizes untouched)."""
    shutil.copytree(src, dst)
    file = dst / "model.safetensors"
    data = file.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size:])
    return dst


@pytest.mark.parametrize(("metadata", "text"), [
    ({"format": 1}, "__metadata__ entry 'format' is 1, not a string"),
    ({"format": None}, "__metadata__ entry 'format' is null, not a string"),
    (["pt"], '__metadata__ ["pt"] is not a map'),
])
def test_header_metadata_that_safetensors_refuses(llama_ckpt: Path, tmp_path: Path, metadata: object,
                                                  text: str) -> None:
    """A __metadata__ of non-string values is valid JSON that safetensors refuses on open: check-config passed it
    (the header check skipped __metadata__), and the load then said the header "is not valid JSON"."""
    model = _with_header_metadata(llama_ckpt, tmp_path / "meta", metadata)
    result = _check(model)
    assert_invalid(result, "--model", f"model.safetensors has a header entry of the wrong type: its {text}")
    assert "re-save it with string __metadata__ values" in result.output
    _serve_fails_the_same_way(model, result)


def test_generate_names_the_header_metadata_not_invalid_json(llama_ckpt: Path, tmp_path: Path) -> None:
    """generate loads without check-config: safetensors' own error ("invalid JSON in header: invalid type") is
    turned into the entry that is wrong, not "is not valid JSON"."""
    model = _with_header_metadata(llama_ckpt, tmp_path / "meta", {"format": 1})
    result = invoke(["generate", str(model), *CPU, "--prompt", "hi", "--max-tokens", "1"])
    assert result.exit_code == 1, result.output
    assert "not valid JSON" not in result.output, result.output
    assert "has a header entry of the wrong type: its __metadata__ entry 'format' is 1" in result.output


def test_header_metadata_of_strings_loads(llama_ckpt: Path, tmp_path: Path) -> None:
    """Control for the __metadata__ tests: the same rewrite with string values loads and passes, so what they show
    is the metadata's value types alone."""
    model = _with_header_metadata(llama_ckpt, tmp_path / "meta-ok", {"format": "pt"})
    assert load_file(model / "model.safetensors").keys() == load_file(llama_ckpt / "model.safetensors").keys()
    assert _check(model).exit_code == 0


def test_missing_tensor(llama_ckpt: Path, tmp_path: Path) -> None:
    model = _copy(llama_ckpt, tmp_path)
    weights = load_file(model / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, model / "model.safetensors")
    assert_invalid(_check(model), "--model", "lacks tensor(s) model.layers.1.mlp.down_proj.weight")


def test_wrong_shape_names_tensor_and_both_shapes(llama_ckpt: Path, tmp_path: Path) -> None:
    model = _copy(llama_ckpt, tmp_path)
    weights = load_file(model / "model.safetensors")
    weights["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(weights, model / "model.safetensors")
    result = _check(model)
    assert_invalid(result, "--model", "'model.layers.0.self_attn.k_proj.weight'")
    assert "checkpoint (16, 64), model expects (32, 64)" in result.output
    _serve_fails_the_same_way(model, result)


def test_config_json_that_does_not_match_the_weights(llama_ckpt: Path, tmp_path: Path) -> None:
    model = _copy(llama_ckpt, tmp_path)
    hf = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**hf, "intermediate_size": 96}))
    assert_invalid(_check(model), "--model", "shape mismatch")


def test_config_vocab_size_other_than_the_embedding_tables_height(llama_ckpt: Path, tmp_path: Path) -> None:
    """A vocab_size that does not match the tables was loaded padded with zero rows (or cut) and served ids the
    model has no row for."""
    model = _copy(llama_ckpt, tmp_path)
    hf = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**hf, "vocab_size": 1000}))  # the tables hold 512 rows
    result = _check(model)
    assert_invalid(result, "--model", "'model.embed_tokens.weight' in model.safetensors: it has 512 vocabulary rows "
                                      "but config.json's vocab_size is 1000")
    assert "'lm_head.weight'" in result.output
    _serve_fails_the_same_way(model, result)


def test_unexpected_tensor(llama_ckpt: Path, tmp_path: Path) -> None:
    model = _copy(llama_ckpt, tmp_path)
    weights = load_file(model / "model.safetensors")
    weights["model.layers.0.mystery.weight"] = torch.zeros(2)
    save_file(weights, model / "model.safetensors")
    assert_invalid(_check(model), "--model", "unexpected tensor 'model.layers.0.mystery.weight'")


def test_integer_weights_are_not_loadable(llama_ckpt: Path, tmp_path: Path) -> None:
    model = _copy(llama_ckpt, tmp_path)
    weights = load_file(model / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"].to(torch.int8)
    save_file(weights, model / "model.safetensors")
    assert_invalid(_check(model), "--model", "'model.norm.weight' in model.safetensors is int8, not a float")


def test_unsigned_weights_are_one_problem_in_the_loads_words(llama_ckpt: Path, tmp_path: Path) -> None:
    """A U16 tensor (U32, U64 alike) was "has dtype U16, which pdlaunch cannot load" and also "checkpoint lacks
    tensor(s) model.norm.weight", which it holds; serve said "is uint16, not a float dtype"."""
    model = _copy(llama_ckpt, tmp_path)
    weights = load_file(model / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"].to(torch.uint16)
    save_file(weights, model / "model.safetensors")
    checked = _check(model)
    assert_invalid(checked, "--model", "'model.norm.weight' in model.safetensors is uint16, not a float dtype")
    assert len(_errors(checked)) == 1, checked.output
    _serve_fails_the_same_way(model, checked)


def test_shard_missing_or_not_holding_what_the_index_says(sharded_ckpt: Path, tmp_path: Path) -> None:
    model = _copy(sharded_ckpt, tmp_path)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    name, shard = sorted(index["weight_map"].items())[0]
    other = next(s for s in sorted(set(index["weight_map"].values())) if s != shard)
    index["weight_map"][name] = other
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_invalid(_check(model), "--model", f"puts {name!r} in {other}")
    (model / other).unlink()
    assert_invalid(_check(model), "--model", f"{other} is missing")


def test_broken_index_file(sharded_ckpt: Path, tmp_path: Path) -> None:
    model = _copy(sharded_ckpt, tmp_path)
    (model / "model.safetensors.index.json").write_text("{")
    assert_invalid(_check(model), "--model", "model.safetensors.index.json")


def test_missing_tokenizer_json(llama_ckpt: Path, tmp_path: Path) -> None:
    model = _copy(llama_ckpt, tmp_path)
    (model / "tokenizer.json").unlink()
    result = _check(model)
    assert_invalid(result, "--model", "tokenizer.json is missing")
    _serve_fails_the_same_way(model, result)


@pytest.mark.parametrize("text", ['{"version": "1.0", "model": ', "{}", ""])
def test_broken_tokenizer_json(llama_ckpt: Path, tmp_path: Path, text: str) -> None:
    model = _copy(llama_ckpt, tmp_path)
    (model / "tokenizer.json").write_text(text)
    result = _check(model)
    assert_invalid(result, "--model", "tokenizer.json does not load")
    _serve_fails_the_same_way(model, result)


def test_broken_tokenizer_config(llama_ckpt: Path, tmp_path: Path) -> None:
    model = _copy(llama_ckpt, tmp_path)
    (model / "tokenizer_config.json").write_text("{'single quotes': 1}")
    assert_invalid(_check(model), "--model", "tokenizer_config.json")


def test_tokenizer_larger_than_the_embedding_table(tmp_path: Path) -> None:
    model = write_model(tmp_path, vocab_size=300)  # the demo tokenizer has 512 tokens
    assert_invalid(_check(model), "--model", "tokenizer.json has 512 tokens but config.json's vocab_size is 300")


def test_chat_template_that_does_not_parse(llama_ckpt: Path, tmp_path: Path) -> None:
    model = _copy(llama_ckpt, tmp_path)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m.content }"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    assert_invalid(_check(model), "--model", "chat template")


def test_every_problem_is_one_line_and_capped(llama_ckpt: Path, tmp_path: Path) -> None:
    model = _copy(llama_ckpt, tmp_path)
    weights = {f"junk.{i}": torch.zeros(1) for i in range(40)}
    save_file(weights, model / "model.safetensors")
    errors = _errors(_check(model))
    assert 2 <= len(errors) <= 8, errors
    assert any("more tensor problem" in line for line in errors)
