"""Drive `pdlaunch` through typer's CliRunner the way a user types it, and build tiny model dirs."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from click.testing import Result
from typer.testing import CliRunner

from pdlaunch.cli import app
from pdlaunch.model.demo_tokenizer import write_tokenizer_files
from tests.helpers.ports import free_port

LLAMA_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "intermediate_size": 256,
    "vocab_size": 1000,
    "max_position_embeddings": 1024,
}


# A proxy port free when the tests started, for the checks that are not about ports: check-config warns about a
# port in use, and the default 8000 is `make serve`'s, which the README's two commands may run beside `make test`.
FREE_PORT = ["--port", str(free_port())]


def invoke(args: list[str]) -> Result:
    """Run the CLI; fail the test on any exception other than the exit the command chose."""
    result = CliRunner().invoke(app, args)
    assert "Traceback" not in result.output, result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"pdlaunch {' '.join(args)} raised {result.exception!r}\n{result.output}")
    return result


def check(args: list[str]) -> Result:
    return invoke(["check-config", *args])


def check_json(args: list[str]) -> dict[str, Any]:
    """check-config --json: stdout holds exactly one JSON object."""
    result = check([*args, "--json"])
    report = json.loads(result.stdout)
    assert report["valid"] == (result.exit_code == 0)
    return report


def assert_invalid(result: Result, field: str, text: str | None = None) -> None:
    """Exit 1, and a problem line naming `field` (and containing `text`)."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith(f"error: {field}:")]
    assert lines, f"no problem for {field!r} in:\n{result.output}"
    if text is not None:
        assert any(text in line for line in lines), f"{text!r} not in {lines}"


def hf_tensor_shapes(hf: dict[str, Any]) -> dict[str, list[int]]:
    """The tensors a transformers Llama/Qwen2/Mistral checkpoint of this config.json holds, by HF name
    (written out here, independently of pdlaunch's model code, so that a test can catch that code)."""
    h, inter, vocab = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"]
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    d = hf.get("head_dim") or h // heads
    shapes = {"model.embed_tokens.weight": [vocab, h], "model.norm.weight": [h]}
    if not hf.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = [vocab, h]
    for i in range(hf["num_hidden_layers"]):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        shapes.update({f"{attn}.q_proj.weight": [heads * d, h], f"{attn}.k_proj.weight": [kv_heads * d, h],
                       f"{attn}.v_proj.weight": [kv_heads * d, h], f"{attn}.o_proj.weight": [h, heads * d],
                       f"{mlp}.gate_proj.weight": [inter, h], f"{mlp}.up_proj.weight": [inter, h],
                       f"{mlp}.down_proj.weight": [h, inter], f"model.layers.{i}.input_layernorm.weight": [h],
                       f"model.layers.{i}.post_attention_layernorm.weight": [h]})
        if "Qwen2ForCausalLM" in hf.get("architectures", []):
            shapes.update({f"{attn}.q_proj.bias": [heads * d], f"{attn}.k_proj.bias": [kv_heads * d],
                           f"{attn}.v_proj.bias": [kv_heads * d]})
    return shapes


def write_safetensors_zeros(file: Path, shapes: dict[str, list[int]]) -> None:
    """A valid bfloat16 safetensors file of all-zero tensors. The data region is a sparse hole, so a
    70B-parameter checkpoint costs a few KiB of disk and is still a file safetensors loads."""
    header: dict[str, Any] = {}
    offset = 0
    for name, shape in shapes.items():
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data region to 8 bytes
    with file.open("wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + offset)


def write_model(root: Path, name: str = "model", **changes: Any) -> Path:
    """A complete checkpoint directory: config.json, zero weights of the right shapes, the demo tokenizer."""
    model_dir = root / name
    model_dir.mkdir(parents=True, exist_ok=True)
    hf = {k: v for k, v in {**LLAMA_CONFIG, **changes}.items() if v is not None}
    (model_dir / "config.json").write_text(json.dumps(hf))
    write_safetensors_zeros(model_dir / "model.safetensors", hf_tensor_shapes(hf))
    write_tokenizer_files(model_dir)
    return model_dir


def write_yaml(root: Path, text: str, name: str = "deploy.yaml") -> Path:
    path = root / name
    path.write_text(text)
    return path
