"""Checkpoint loading: config dialects, KV cache groups, and the errors a user sees."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.arch import KVCacheGroup, parse_hf_config
from pdlaunch.model.checkpoint import load_checkpoint, resolve_dtype
from pdlaunch.model.loader import load_model
from pdlaunch.model.rotary import compute_inv_freq


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes: object) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_arch_of_each_family(llama_ckpt: Path, qwen2_ckpt: Path, mistral_ckpt: Path, hybrid_ckpt: Path) -> None:
    llama = load_checkpoint(str(llama_ckpt)).arch
    assert (llama.num_heads, llama.num_kv_heads, llama.head_dim) == (4, 2, 16)
    assert llama.rope_scaling is not None and llama.rope_scaling.rope_type == "llama3"
    assert not llama.attention_bias
    assert llama.kv_cache_groups() == [KVCacheGroup(layers=[0, 1], sliding_window=None)]

    qwen2 = load_checkpoint(str(qwen2_ckpt)).arch
    assert qwen2.attention_bias and not qwen2.o_proj_bias
    assert qwen2.rope_theta == 1000000.0 and qwen2.sliding_window is None

    mistral = load_checkpoint(str(mistral_ckpt)).arch
    assert mistral.layer_types == ["sliding_attention"] * 2
    assert mistral.kv_cache_groups() == [KVCacheGroup(layers=[0, 1], sliding_window=8)]

    hybrid = load_checkpoint(str(hybrid_ckpt)).arch
    assert hybrid.kv_cache_groups() == [KVCacheGroup([0, 2], None), KVCacheGroup([1, 3], 6)]
    assert hybrid.layer_group_index() == [(0, 0), (1, 0), (0, 1), (1, 1)]


def test_model_reports_each_layers_group(hybrid_ckpt: Path) -> None:
    model = load_model(load_checkpoint(str(hybrid_ckpt)), torch.device("cpu"), torch.float32)
    assert model.kv_cache_groups == model.arch.kv_cache_groups()
    assert [model.layer_kv_group(i) for i in range(4)] == [(0, 0), (1, 0), (0, 1), (1, 1)]


def _base(**extra: object) -> dict:
    cfg = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
           "num_hidden_layers": 4, "num_key_value_heads": 2, "vocab_size": 512, "intermediate_size": 128}
    cfg.update(extra)
    return cfg


def test_qwen2_layer_types_derived_like_transformers() -> None:
    arch = parse_hf_config(_base(use_sliding_window=True, sliding_window=16, max_window_layers=2))
    assert arch.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    off = parse_hf_config(_base(use_sliding_window=False, sliding_window=16, layer_types=["sliding_attention"] * 4))
    assert off.sliding_window is None and off.kv_cache_groups() == [KVCacheGroup([0, 1, 2, 3], None)]
    mistral = parse_hf_config(_base(architectures=["MistralForCausalLM"], sliding_window=None))
    assert mistral.layer_types == ["full_attention"] * 4


def test_transformers_4_rope_dialect_parses_like_5() -> None:
    v5 = parse_hf_config(_base(architectures=["LlamaForCausalLM"], rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}))
    v4 = parse_hf_config(_base(architectures=["LlamaForCausalLM"], rope_theta=500000.0, rope_scaling={
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}))
    assert v4 == v5
    inv = compute_inv_freq(16, v5.rope_theta, v5.rope_scaling, 512)
    plain = compute_inv_freq(16, v5.rope_theta, None, 512)
    # llama3 keeps the highest frequency and divides the lowest by `factor`.
    assert inv[0] == plain[0] and torch.isclose(inv[-1], plain[-1] / 8)


def test_unsupported_architecture_names_it_and_the_supported_ones(llama_ckpt: Path, tmp_path: Path) -> None:
    path = _copy(llama_ckpt, tmp_path / "gpt2")
    _edit_config(path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(PdlaunchError) as err:
        load_checkpoint(str(path))
    assert "GPT2LMHeadModel" in str(err.value) and "LlamaForCausalLM" in str(err.value)


def test_unsupported_rope_type_is_named() -> None:
    with pytest.raises(PdlaunchError, match="yarn"):
        parse_hf_config(_base(rope_scaling={"rope_type": "yarn", "factor": 4.0}))


def test_missing_config_json(llama_ckpt: Path, tmp_path: Path) -> None:
    path = _copy(llama_ckpt, tmp_path / "noconfig")
    (path / "config.json").unlink()
    with pytest.raises(PdlaunchError, match="config.json") as err:
        load_checkpoint(str(path))
    assert err.value.field == "model.path"


def test_missing_directory_names_model_path(tmp_path: Path) -> None:
    with pytest.raises(PdlaunchError) as err:
        load_checkpoint(str(tmp_path / "nope"))
    assert err.value.field == "model.path" and "demo" in str(err.value)


def test_missing_tokenizer_json(llama_ckpt: Path, tmp_path: Path) -> None:
    path = _copy(llama_ckpt, tmp_path / "notok")
    (path / "tokenizer.json").unlink()
    with pytest.raises(PdlaunchError, match="tokenizer.json"):
        load_checkpoint(str(path))


def test_missing_tensor_is_named(llama_ckpt: Path, tmp_path: Path) -> None:
    path = _copy(llama_ckpt, tmp_path / "notensor")
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, path / "model.safetensors")
    with pytest.raises(PdlaunchError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(load_checkpoint(str(path)), torch.device("cpu"), torch.float32)


def test_unexpected_tensor_is_named(llama_ckpt: Path, tmp_path: Path) -> None:
    path = _copy(llama_ckpt, tmp_path / "extra")
    weights = load_file(path / "model.safetensors")
    weights["model.layers.0.self_attn.mystery.weight"] = torch.zeros(2)
    save_file(weights, path / "model.safetensors")
    with pytest.raises(PdlaunchError, match="mystery"):
        load_model(load_checkpoint(str(path)), torch.device("cpu"), torch.float32)


def test_wrong_shape_is_named(llama_ckpt: Path, tmp_path: Path) -> None:
    path = _copy(llama_ckpt, tmp_path / "shape")
    _edit_config(path, intermediate_size=96)
    with pytest.raises(PdlaunchError, match=r"mlp\.(gate|up|down)_proj\.weight.*shape mismatch"):
        load_model(load_checkpoint(str(path)), torch.device("cpu"), torch.float32)


def test_missing_shard_is_named(sharded_ckpt: Path, tmp_path: Path) -> None:
    path = _copy(sharded_ckpt, tmp_path / "shards")
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(PdlaunchError, match=victim.name):
        load_model(load_checkpoint(str(path)), torch.device("cpu"), torch.float32)


def test_no_weights_at_all(llama_ckpt: Path, tmp_path: Path) -> None:
    path = _copy(llama_ckpt, tmp_path / "noweights")
    (path / "model.safetensors").unlink()
    with pytest.raises(PdlaunchError, match="safetensors"):
        load_model(load_checkpoint(str(path)), torch.device("cpu"), torch.float32)


def test_bfloat16_checkpoint_loads_into_float32(llama_ckpt: Path, tmp_path: Path) -> None:
    path = _copy(llama_ckpt, tmp_path / "bf16")
    weights = {k: v.to(torch.bfloat16) for k, v in load_file(path / "model.safetensors").items()}
    save_file(weights, path / "model.safetensors")
    model = load_model(load_checkpoint(str(path)), torch.device("cpu"), torch.float32)
    expected = weights["model.norm.weight"].float()
    assert model.model.norm.weight.dtype == torch.float32
    assert torch.equal(model.model.norm.weight, expected)


def test_weights_load_in_place_without_meta_leftovers(sharded_ckpt: Path) -> None:
    model = load_model(load_checkpoint(str(sharded_ckpt)), torch.device("cpu"), torch.bfloat16)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert tensor.device.type == "cpu", name
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_resolve_dtype() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(PdlaunchError) as err:
        resolve_dtype("int8", torch.device("cpu"))
    assert err.value.field == "model.dtype"


def test_large_checkpoint_shows_a_progress_bar_on_a_tty(llama_ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    from pdlaunch.model import loader

    monkeypatch.setattr(loader, "PROGRESS_BAR_MIN_BYTES", 0)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    load_model(load_checkpoint(str(llama_ckpt)), torch.device("cpu"), torch.float32)
    assert "loading" in capsys.readouterr().out


def test_cpu_caches_never_use_the_cuda_decode_kernel() -> None:
    from pdlaunch.model.triton_decode import paged_decode_available

    assert not paged_decode_available(torch.zeros(2, 1, 2, 4, 1, 8))


def test_truncated_weights_fail_with_a_readable_error(llama_ckpt: Path, tmp_path: Path) -> None:
    # An instance loading a damaged file says what is wrong, not safetensors' raw header error.
    path = _copy(llama_ckpt, tmp_path / "truncated")
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(PdlaunchError, match="truncated") as err:
        load_model(load_checkpoint(str(path)), torch.device("cpu"), torch.float32)
    assert err.value.field == "model.path" and "deserializing" not in str(err.value)


def test_broken_tokenizer_json_is_a_pdlaunch_error(llama_ckpt: Path, tmp_path: Path) -> None:
    path = _copy(llama_ckpt, tmp_path / "badtok")
    (path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(PdlaunchError, match="tokenizer.json does not load") as err:
        load_checkpoint(str(path))
    assert err.value.field == "model.path"


def test_integer_weights_are_refused(llama_ckpt: Path, tmp_path: Path) -> None:
    path = _copy(llama_ckpt, tmp_path / "int8")
    weights = load_file(path / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"].to(torch.int8)
    save_file(weights, path / "model.safetensors")
    with pytest.raises(PdlaunchError, match="int8, not a float dtype"):
        load_model(load_checkpoint(str(path)), torch.device("cpu"), torch.float32)


def test_a_header_entry_of_the_wrong_type_is_not_called_invalid_json(llama_ckpt: Path) -> None:
    """safetensors says "invalid JSON in header: invalid type: ..." of valid JSON holding a value of the wrong type:
    the message says so (with safetensors' detail where the header check finds nothing to name), not that the
    JSON is invalid. Whether it is reachable past read_header's checks depends on the safetensors version."""
    from safetensors import SafetensorError

    from pdlaunch.model.weight_files import unreadable

    exc = SafetensorError("Error while deserializing header: invalid JSON in header: invalid type: integer `1`, "
                          "expected a string at line 1 column 90")
    err = unreadable(llama_ckpt / "model.safetensors", exc)
    assert "has a header entry of the wrong type (invalid type: integer `1`, expected a string" in err.message
    assert "not valid JSON" not in err.message and err.field == "model.path"
    broken = unreadable(llama_ckpt / "model.safetensors",
                        SafetensorError("Error while deserializing header: invalid JSON in header: expected value"))
    assert "has a header that is not valid JSON" in broken.message
