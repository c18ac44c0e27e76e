"""The Llama-3-8B-shaped checkpoint generator: full-size shapes by arithmetic, a tiny one on disk."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from pdlaunch.bench.checkpoint_shapes import LLAMA3_8B, tensor_shapes
from pdlaunch.bench.cli import bench_app
from pdlaunch.bench.make_checkpoint import make_llama3_8b_shaped, plan_shards
from pdlaunch.errors import PdlaunchError
from pdlaunch.model.demo_tokenizer import build_demo_tokenizer

TINY = {"hidden_size": 64, "intermediate_size": 160, "num_attention_heads": 4, "num_key_value_heads": 2}


def test_full_shape_is_llama3_8b() -> None:
    cfg = {**LLAMA3_8B, "head_dim": 128}
    shapes = dict(tensor_shapes(cfg))
    assert sum(math.prod(s) for s in shapes.values()) == 8_030_261_248  # Meta-Llama-3-8B parameter count
    assert shapes["model.layers.31.self_attn.k_proj.weight"] == (1024, 4096)  # 8 KV heads x 128
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (4096, 14336)
    assert shapes["lm_head.weight"] == (128256, 4096)
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["max_position_embeddings"] == 8192
    # 4 GiB bf16 shards: every shard but those holding one oversized tensor stays under the limit
    shards = plan_shards(tensor_shapes(cfg), 2, 4 * 2**30)
    assert [name for shard in shards for name, _ in shard] == list(shapes)
    assert all(sum(math.prod(s) * 2 for _, s in shard) <= 4 * 2**30 for shard in shards)
    assert len(shards) == 4


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama3_8b_shaped(tmp_path_factory.mktemp("llama3") / "ckpt", num_layers=2, overrides=TINY,
                                 max_shard_bytes=2**20, seed=3)


def test_tiny_checkpoint_is_sharded_with_a_complete_index(tiny_ckpt: Path) -> None:
    index = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files == sorted(p.name for p in tiny_ckpt.glob("*.safetensors"))
    total = 0
    for fname in files:
        with safe_open(str(tiny_ckpt / fname), "pt") as f:
            for name in f.keys():
                assert index["weight_map"][name] == fname
                t = f.get_tensor(name)
                assert t.dtype == torch.bfloat16
                total += t.numel() * t.element_size()
    assert total == index["metadata"]["total_size"]
    config = json.loads((tiny_ckpt / "config.json").read_text())
    assert set(index["weight_map"]) == {name for name, _ in tensor_shapes(config)}


@pytest.mark.slow
def test_tiny_checkpoint_loads_with_transformers(tiny_ckpt: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(tiny_ckpt)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads, cfg.vocab_size) == (2, 64, 2, 128256)
    model = AutoModelForCausalLM.from_pretrained(tiny_ckpt)
    assert model.model.layers[1].self_attn.k_proj.weight.shape == (2 * 16, 64)
    assert model.model.layers[0].mlp.up_proj.weight.shape == (160, 64)
    assert model.lm_head.weight.shape == (128256, 64)
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    assert len(tok) == 128256
    text = "The capital of France is Paris."
    assert tok(text).input_ids == build_demo_tokenizer().encode(text).ids  # same ids as the demo model
    ids = tok(text, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)
    assert tok.decode(out[0, -4:]) != ""  # every id of the 128256-way vocabulary has text


def test_weights_do_not_depend_on_the_shard_plan(tmp_path: Path, tiny_ckpt: Path) -> None:
    other = make_llama3_8b_shaped(tmp_path / "again", num_layers=2, overrides=TINY, max_shard_bytes=2**30, seed=3)
    name = "model.layers.1.mlp.gate_proj.weight"
    index = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())
    with safe_open(str(tiny_ckpt / index["weight_map"][name]), "pt") as a, \
            safe_open(str(other / "model-00001-of-00001.safetensors"), "pt") as b:
        assert torch.equal(a.get_tensor(name), b.get_tensor(name))  # a different shard plan, same values


def test_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(PdlaunchError, match="not empty"):
        make_llama3_8b_shaped(tmp_path, num_layers=1, overrides=TINY)
    result = CliRunner().invoke(bench_app, ["make-checkpoint", str(tmp_path), "--num-layers", "1"])
    assert result.exit_code == 1 and "--overwrite" in result.output


def test_cli_rejects_unknown_dtype(tmp_path: Path) -> None:
    result = CliRunner().invoke(bench_app, ["make-checkpoint", str(tmp_path / "x"), "--dtype", "fp8"])
    assert result.exit_code == 1 and "--dtype" in result.output and "bfloat16" in result.output


def test_cli_rejects_unknown_device(tmp_path: Path) -> None:
    result = CliRunner().invoke(bench_app, ["make-checkpoint", str(tmp_path / "x"), "--device", "tpu"])
    assert result.exit_code == 1 and "--device" in result.output and "Traceback" not in result.output


def test_qwen3_30b_a3b_shape_matches_transformers_parameter_for_parameter() -> None:
    """Every name and shape of the full 48-layer, 128-expert model, against transformers' own (meta device)."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from pdlaunch.bench.checkpoint_shapes import QWEN3_30B_A3B

    shapes = dict(tensor_shapes(QWEN3_30B_A3B))
    assert shapes["model.layers.47.mlp.experts.127.down_proj.weight"] == (2048, 768)
    assert shapes["model.layers.0.mlp.gate.weight"] == (128, 2048)
    cfg = Qwen3MoeConfig(**{k: v for k, v in QWEN3_30B_A3B.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in hf.parameters())
    assert sum(math.prod(s) for s in shapes.values()) == total  # 30.5B, as Qwen3-30B-A3B's model card says
    assert round(total / 1e9, 1) == 30.5


def test_tiny_qwen3_moe_shaped_checkpoint_loads_and_checks(tmp_path: Path) -> None:
    from pdlaunch.bench.make_checkpoint import make_shaped_checkpoint
    from pdlaunch.model.checkpoint import load_checkpoint
    from pdlaunch.model.loader import load_model
    from tests.config.cli_helpers import check

    tiny = {"hidden_size": 64, "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    path = make_shaped_checkpoint(tmp_path / "moe", shape="qwen3-30b-a3b", num_layers=2, overrides=tiny,
                                  dtype=torch.float32)
    assert check(["--model", str(path), "--device", "cpu"]).exit_code == 0
    model = load_model(load_checkpoint(str(path)), torch.device("cpu"), torch.float32)
    assert model.model.layers[1].mlp.experts.w13.shape == (4, 64, 64)
    with pytest.raises(PdlaunchError, match="--shape"):
        make_shaped_checkpoint(tmp_path / "x", shape="gpt-oss-120b")


def test_mixtral_8x7b_shape_matches_transformers_parameter_for_parameter() -> None:
    """The full 32-layer, 8-expert Mixtral-8x7B: every tensor ours writes, against transformers' own model
    (meta device) and its 46.7B parameters; the config parses as the MoE our engine serves."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    from pdlaunch.bench.checkpoint_shapes import MIXTRAL_8X7B
    from pdlaunch.model.arch import parse_hf_config

    shapes = dict(tensor_shapes(MIXTRAL_8X7B))
    assert shapes["model.layers.31.block_sparse_moe.experts.7.w2.weight"] == (4096, 14336)
    assert shapes["model.layers.0.block_sparse_moe.experts.0.w3.weight"] == (14336, 4096)
    assert shapes["model.layers.0.block_sparse_moe.gate.weight"] == (8, 4096)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (1024, 4096)  # 8 KV heads x 128
    assert shapes["lm_head.weight"] == (32000, 4096)
    cfg = MixtralConfig(**{k: v for k, v in MIXTRAL_8X7B.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in hf.parameters())
    assert sum(math.prod(s) for s in shapes.values()) == total and round(total / 1e9, 1) == 46.7
    arch = parse_hf_config(MIXTRAL_8X7B)
    assert arch.moe is not None and (arch.moe.num_experts, arch.moe.top_k) == (8, 2)
    assert arch.moe.expert_intermediate_size == 14336 and arch.moe.checkpoint_style == "block_sparse_moe"


def test_tiny_mixtral_shaped_checkpoint_loads_in_transformers_and_ours(tmp_path: Path) -> None:
    """`bench make-checkpoint --shape mixtral-8x7b` shrunk: check-config passes, transformers finds every
    weight it expects under Mixtral's HF names, and our loader stacks the experts."""
    from transformers import AutoModelForCausalLM

    from pdlaunch.bench.make_checkpoint import make_shaped_checkpoint
    from pdlaunch.model.checkpoint import load_checkpoint
    from pdlaunch.model.loader import load_model
    from tests.config.cli_helpers import check

    tiny = {"hidden_size": 64, "intermediate_size": 32, "num_local_experts": 4, "num_experts_per_tok": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    path = make_shaped_checkpoint(tmp_path / "tiny", shape="mixtral-8x7b", num_layers=2, overrides=tiny,
                                  dtype=torch.float32)
    assert check(["--model", str(path), "--device", "cpu"]).exit_code == 0
    _, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    model = load_model(load_checkpoint(str(path)), torch.device("cpu"), torch.float32)
    assert model.model.layers[1].mlp.experts.w13.shape == (4, 64, 64)


def test_cli_names_every_shape_for_an_unknown_one(tmp_path: Path) -> None:
    result = CliRunner().invoke(bench_app, ["make-checkpoint", str(tmp_path / "x"), "--shape", "gpt-oss-120b"])
    assert result.exit_code == 1 and "--shape" in result.output and "Traceback" not in result.output
    assert all(shape in result.output for shape in ("llama3-8b", "qwen3-30b-a3b", "mixtral-8x7b"))


def test_the_qwen3_30b_a3b_checkpoint_keeps_the_real_head_dim(tmp_path: Path) -> None:
    """Qwen3-30B-A3B's heads are 128 wide though hidden_size / num_attention_heads is 64: the written config.json
    said head_dim 64 (recomputed from hidden_size), so q_proj was (2048, 2048) instead of (4096, 2048) and the KV
    cache half the real one's bytes per token. Fewer and narrower experts and a small vocabulary keep it quick; the
    attention keeps the real shape."""
    from pdlaunch.bench.make_checkpoint import make_shaped_checkpoint

    small = {"num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 128, "vocab_size": 1024}
    path = make_shaped_checkpoint(tmp_path / "moe", shape="qwen3-30b-a3b", num_layers=1, overrides=small)
    assert json.loads((path / "config.json").read_text())["head_dim"] == 128
    with safe_open(str(path / "model-00001-of-00001.safetensors"), "pt") as f:
        assert tuple(f.get_slice("model.layers.0.self_attn.q_proj.weight").get_shape()) == (4096, 2048)
        assert tuple(f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape()) == (512, 2048)
