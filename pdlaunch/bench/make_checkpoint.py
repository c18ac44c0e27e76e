"""A random-weight checkpoint of a real model's shape on local disk, for benchmarks.

Shapes (`SHAPES`): `llama3-8b` (meta-llama/Meta-Llama-3-8B, llama3 rope scaling), `qwen3-30b-a3b`
(Qwen/Qwen3-30B-A3B: 48 layers, 128 experts of width 768, top-8, 4 KV heads, per-expert HF tensor
names) and `mixtral-8x7b` (mistralai/Mixtral-8x7B-v0.1: 32 layers, 8 experts of width 14336, top-2,
8 KV heads, `block_sparse_moe.experts.{e}.w1/w2/w3`). Same tensor names, shapes and config as the real
model, so speed figures are its own; the weights are random (std 0.02, norms 1) and the tokenizer is the
demo model's byte-level BPE padded to the full vocabulary, so the text is noise.
Written shard by shard: at most one shard (`max_shard_bytes`) is in memory at a time. With `fp8`
the linear layers' weights (experts' too) are quantized where they are drawn and saved as FP8: `block`
as a 128x128-block `quant_method: fp8` checkpoint (weight_scale_inv), `channel` as a compressed-tensors
FP8-Dynamic one (weight_scale per output channel).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import zlib
from pathlib import Path
from typing import Any

import torch
from pydantic import JsonValue
from safetensors import SafetensorError
from safetensors.torch import save_file

from pdlaunch.config.rules.host import make_output_dir
from pdlaunch.errors import PdlaunchError
from pdlaunch.memory.platform import resolve_device
from pdlaunch.model.arch import HFConfigJson
from pdlaunch.model.demo_tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, generation_config
from pdlaunch.model.moe.config import MOE_ARCHITECTURES, MoeArch, parse_moe
from pdlaunch.model.quant import fp8 as fp8_math

LLAMA3_8B: HFConfigJson = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "use_cache": True,
}
QWEN3_30B_A3B: HFConfigJson = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "use_cache": True,
}
MIXTRAL_8X7B: HFConfigJson = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "hidden_size": 4096,
    "intermediate_size": 14336,  # every expert's width
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "router_aux_loss_coef": 0.02,
    "output_router_logits": False,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "use_cache": True,
}
SHAPES: dict[str, HFConfigJson] = {"llama3-8b": LLAMA3_8B, "qwen3-30b-a3b": QWEN3_30B_A3B,
                                     "mixtral-8x7b": MIXTRAL_8X7B}
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise PdlaunchError(f"unknown dtype {name!r}", field="--dtype", hint=f"one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _mlp_shapes(cfg: HFConfigJson, moe: MoeArch | None, p: str, layer: int) -> list[tuple[str, tuple[int, ...]]]:
    """The MLP of one layer: dense gate/up/down, or the router and every expert's three (Qwen3-MoE's
    `mlp.experts.{e}.gate_proj/up_proj/down_proj`, Mixtral's `block_sparse_moe.experts.{e}.w1/w3/w2`)."""
    h = cfg["hidden_size"]
    if moe is None or not moe.is_sparse(layer):
        inter = cfg["intermediate_size"]
        return [(f"{p}.mlp.gate_proj.weight", (inter, h)), (f"{p}.mlp.up_proj.weight", (inter, h)),
                (f"{p}.mlp.down_proj.weight", (h, inter))]
    inter, block = moe.expert_intermediate_size, moe.checkpoint_style
    gate, up, down = ("w1", "w3", "w2") if block == "block_sparse_moe" else ("gate_proj", "up_proj", "down_proj")
    shapes: list[tuple[str, tuple[int, ...]]] = [(f"{p}.{block}.gate.weight", (moe.num_experts, h))]
    for e in range(moe.num_experts):
        shapes += [(f"{p}.{block}.experts.{e}.{gate}.weight", (inter, h)),
                   (f"{p}.{block}.experts.{e}.{up}.weight", (inter, h)),
                   (f"{p}.{block}.experts.{e}.{down}.weight", (h, inter))]
    return shapes


def tensor_shapes(cfg: HFConfigJson) -> list[tuple[str, tuple[int, ...]]]:
    """HF parameter names and shapes (Llama, Qwen3-MoE with its q/k norms and experts, or Mixtral), in file
    order (embedding, layers, norm, head)."""
    h, vocab = cfg["hidden_size"], cfg["vocab_size"]
    arch = cfg["architectures"][0]
    moe = parse_moe(dict(cfg), arch, cfg["num_hidden_layers"]) if arch in MOE_ARCHITECTURES else None
    head_dim = cfg["head_dim"]
    q_out, kv_out = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (q_out, h)),
            (f"{p}.self_attn.k_proj.weight", (kv_out, h)),
            (f"{p}.self_attn.v_proj.weight", (kv_out, h)),
            (f"{p}.self_attn.o_proj.weight", (h, q_out)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
        ]
        if cfg["architectures"] == ["Qwen3MoeForCausalLM"]:
            shapes += [(f"{p}.self_attn.q_norm.weight", (head_dim,)), (f"{p}.self_attn.k_norm.weight", (head_dim,))]
        shapes += _mlp_shapes(cfg, moe, p, i)
    shapes.append(("model.norm.weight", (h,)))
    if not cfg["tie_word_embeddings"]:
        shapes.append(("lm_head.weight", (vocab, h)))
    return shapes


def plan_shards(shapes: list[tuple[str, tuple[int, ...]]], itemsize: int,
                max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy split in file order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


FP8_FORMATS = ("block", "channel")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # what write_tokenizer writes
_SEED_LIMIT = 2**43
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")


def fp8_quant_config(fp8: str) -> dict[str, JsonValue]:
    """config.json's quantization_config for `bench make-checkpoint --fp8 block|channel`."""
    if fp8 == "block":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"]}
    numbers: dict[str, JsonValue] = {"num_bits": 8, "type": "float", "symmetric": True}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
            "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"],
                                          "weights": {**numbers, "strategy": "channel", "dynamic": False},
                                          "input_activations": {**numbers, "strategy": "token", "dynamic": True}}}}


def _random_tensors(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int, std: float,
                    device: str, fp8: str | None = None) -> dict[str, torch.Tensor]:
    """`name` -> values drawn on `device` (a GPU draws 8B values in seconds, a CPU core in minutes), returned
    on the CPU; with `fp8`, a linear weight comes back as e4m3 with its scale tensor."""
    if name.endswith("norm.weight"):
        return {name: torch.ones(shape, dtype=dtype)}
    # Seeded per tensor name: a tensor's values depend on seed and device, not on the shard plan.
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    values = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=gen)
    module = name.removesuffix(".weight")
    if fp8 is None or module.rsplit(".", 1)[-1] not in _LINEARS:
        return {name: values.cpu()}
    if fp8 == "block":
        q, scale = fp8_math.quantize_block(values)
        return {name: q.cpu(), f"{module}.weight_scale_inv": scale.cpu()}
    q, scale = fp8_math.quantize_per_channel(values)
    return {name: q.cpu(), f"{module}.weight_scale": scale.unsqueeze(1).cpu()}


def write_tokenizer(out_dir: Path, vocab_size: int, model_max_length: int) -> None:
    """The demo tokenizer's files (pdlaunch.model.demo_tokenizer), its vocabulary padded to
    `vocab_size` with filler tokens `<tN>` that decode to themselves.

    Ids below the demo's 512 keep their meaning (bytes, merges, specials, chat template), so text
    encodes as it does for the demo model, and every id a random 128256-way model samples decodes.
    The fillers go into the BPE vocabulary (never produced by encoding: no merge makes them), and the
    specials are listed there too so that they keep their ids."""
    from tokenizers import Tokenizer

    from pdlaunch.model.demo_tokenizer import VOCAB_SIZE, build_demo_tokenizer, write_tokenizer_files

    if vocab_size < VOCAB_SIZE:
        raise PdlaunchError(f"must be at least {VOCAB_SIZE} (the demo tokenizer's ids)", field="vocab_size")
    write_tokenizer_files(out_dir)  # tokenizer_config.json (chat template, bos/eos), tokenizer.json
    spec = json.loads(build_demo_tokenizer().to_str())
    vocab = spec["model"]["vocab"]
    for added in spec["added_tokens"]:
        vocab[added["content"]] = added["id"]
    vocab.update({f"<t{i}>": i for i in range(VOCAB_SIZE, vocab_size)})
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    if tokenizer.get_vocab_size() != vocab_size:
        raise PdlaunchError(f"tokenizer came out with {tokenizer.get_vocab_size()} ids, not {vocab_size}",
                            field="vocab_size")
    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=False)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["model_max_length"] = model_max_length
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def make_llama3_8b_shaped(out_dir: Path | str, **kwargs: Any) -> Path:
    """`make_shaped_checkpoint` of the Llama-3-8B shape."""
    return make_shaped_checkpoint(out_dir, shape="llama3-8b", **kwargs)


def make_shaped_checkpoint(
    out_dir: Path | str,
    *,
    shape: str = "llama3-8b",
    num_layers: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    max_shard_bytes: int = 4 * 2**30,
    overrides: HFConfigJson | None = None,
    overwrite: bool = False,
    progress: bool = False,
    device: str = "cpu",
    fp8: str | None = None,
) -> Path:
    """Write config.json, generation_config.json, tokenizer files and sharded safetensors with
    model.safetensors.index.json. `overrides` changes config keys (e.g. a tiny hidden_size for tests).
    Returns the checkpoint folder."""
    out = Path(out_dir)
    device = resolve_device(device)
    if device != "cpu" and not (device.split(":")[0] == "cuda" and torch.cuda.is_available()):
        raise PdlaunchError(f"cannot draw weights on {device!r}", field="--device",
                            hint="auto, cpu, or cuda[:N] on a machine with a CUDA device")
    if out.exists() and not out.is_dir():
        raise PdlaunchError(f"{out} is a file, not a folder", field="OUT_DIR", hint="give a folder to write into")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise PdlaunchError(f"{out} is not empty", field="OUT_DIR", hint="pick an empty folder or pass --overwrite")
    if fp8 is not None and fp8 not in FP8_FORMATS:
        raise PdlaunchError(f"unknown FP8 format {fp8!r}", field="--fp8", hint=f"one of {', '.join(FP8_FORMATS)}")
    if shape not in SHAPES:
        raise PdlaunchError(f"unknown shape {shape!r}", field="--shape", hint=f"one of {', '.join(SHAPES)}")
    if abs(seed) >= _SEED_LIMIT:  # seed * 1_000_003 + crc32 must fit torch's 64-bit generator seed
        raise PdlaunchError(f"{seed} is out of range", field="--seed", hint="give a seed of magnitude below 2**43")
    base = SHAPES[shape]
    num_layers = base["num_hidden_layers"] if num_layers is None else num_layers
    if num_layers < 1:
        raise PdlaunchError("must be at least 1", field="--num-layers",
                            hint=f"{base['num_hidden_layers']} is the real {shape} depth")
    cfg: HFConfigJson = {**base, "num_hidden_layers": num_layers, **(overrides or {})}
    if "head_dim" not in (overrides or {}):
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise PdlaunchError("num_attention_heads must be a multiple of num_key_value_heads", field="overrides")
    cfg |= {"torch_dtype": str(dtype).removeprefix("torch."), "bos_token_id": BOS_TOKEN_ID,
            "eos_token_id": EOS_TOKEN_ID}
    itemsize = torch.empty((), dtype=dtype).element_size()
    _check_free_space(out, _checkpoint_bytes(cfg, itemsize, fp8))
    existed = out.exists()
    make_output_dir(out, "OUT_DIR")
    shards = plan_shards(tensor_shapes(cfg), itemsize, max_shard_bytes)
    written: list[Path] = []
    try:
        _write_checkpoint(out, cfg, shards, dtype, seed, device, fp8, progress, written)
    except BaseException as exc:
        # a folder of some shards and no config.json is no checkpoint, and a rerun would call it "not empty"
        _remove(written, out if not existed else None)
        if isinstance(exc, KeyboardInterrupt) and progress:
            print(f"interrupted: the files written so far were removed from {out}", file=sys.stderr)
        if isinstance(exc, OSError | SafetensorError):  # the disk filled up, or the folder went away
            raise PdlaunchError(f"cannot write the checkpoint into {out}: {_write_failure(exc)}", field="OUT_DIR",
                                hint="the files written so far were removed; free space there or give another "
                                "folder") from None
        raise
    return out


def _weight_bytes(shapes: list[tuple[str, tuple[int, ...]]], itemsize: int, fp8: str | None) -> int:
    """FP8 linear weights count one byte each and their scales none: a lower bound of the bytes written."""
    return sum(math.prod(shape) * (1 if fp8 is not None and name.removesuffix(".weight").rsplit(".", 1)[-1]
                                   in _LINEARS else itemsize) for name, shape in shapes)


def _checkpoint_bytes(cfg: HFConfigJson, itemsize: int, fp8: str | None) -> int:
    """The weights' bytes from a one- and a two-layer model (every layer of a SHAPES model is alike): listing
    the tensors of a --num-layers typed with a few zeros too many would take longer than refusing it."""
    one, two = (_weight_bytes(tensor_shapes({**cfg, "num_hidden_layers": n}), itemsize, fp8) for n in (1, 2))
    return one + (cfg["num_hidden_layers"] - 1) * (two - one)


def _check_free_space(out: Path, needed: int) -> None:
    """Refuse before the first shard a checkpoint the disk cannot hold, rather than fill the disk and fail on the
    last shard. With --overwrite the weights already in `out` count as free: they are replaced."""
    there = next(p for p in (out, *out.parents) if p.exists())
    free = shutil.disk_usage(there).free
    if out.is_dir():
        free += sum(f.stat().st_size for f in out.glob("*.safetensors") if f.is_file())
    if needed > free:
        raise PdlaunchError(f"the checkpoint takes {needed / 2**30:,.1f} GiB but the disk holding {out} has "
                            f"{free / 2**30:,.1f} GiB free", field="OUT_DIR",
                            hint="free space there, give a folder on another disk, or fewer --num-layers")


def _remove(files: list[Path], folder: Path | None) -> None:
    """Each of `files`, then `folder` once it is empty; what cannot be removed (the folder went away) stays."""
    with contextlib.suppress(OSError):
        for path in files:
            path.unlink(missing_ok=True)
        if folder is not None and not any(folder.iterdir()):
            folder.rmdir()


def _write_failure(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc).removeprefix("Error while serializing: ")  # safetensors' wording of an I/O error


def _write_checkpoint(out: Path, cfg: HFConfigJson, shards: list[list[tuple[str, tuple[int, ...]]]],
                      dtype: torch.dtype, seed: int, device: str, fp8: str | None, progress: bool,
                      written: list[Path]) -> None:
    """The shards, then the index, config and tokenizer files; every path goes into `written` before it is
    opened, so that a failure partway can remove each one."""
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        std = cfg["initializer_range"]
        tensors = {key: t for name, shape in shard
                   for key, t in _random_tensors(name, shape, dtype, seed, std, device, fp8).items()}
        written.append(out / fname)
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
        if progress:
            print(f"wrote {fname} ({k}/{len(shards)})", flush=True)

    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    if fp8 is not None:
        cfg["quantization_config"] = fp8_quant_config(fp8)
    written += [out / name for name in ("model.safetensors.index.json", "config.json", "generation_config.json",
                                        *TOKENIZER_FILES)]
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation_config(), indent=2) + "\n")
    write_tokenizer(out, cfg["vocab_size"], cfg["max_position_embeddings"])
