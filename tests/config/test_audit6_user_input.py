"""Audit 6 of user input, through the real CLI as a new user types it: a config.json size that is missing or not a
positive integer is named with what it holds, a quantization_config without a quant_method says so, a YAML
`model: NAME` line (vLLM's habit) is answered with the form to write, overlapping port ranges read as English, the
memory table says what its KV column counts, vLLM's `--served-model-name A B` is pointed at the YAML list, and
`--device cuda` without CUDA names a fix that serve and smoke have."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdlaunch.memory.host_devices import cuda_available
from tests.config.cli_helpers import assert_invalid, check, invoke, write_model, write_yaml

CPU = ["--device", "cpu"]


@pytest.mark.parametrize(("changes", "said"), [
    # was "lacks positive integers for num_attention_heads" for a key that is there, quoted
    ({"num_attention_heads": "8"}, "num_attention_heads is '8', not a positive integer"),
    ({"hidden_size": None}, "lacks hidden_size"),
    ({"hidden_size": None, "num_hidden_layers": 0, "vocab_size": -1},
     "lacks hidden_size; num_hidden_layers is 0, vocab_size is -1, not positive integers"),
    # was "has invalid num_key_value_heads/head_dim", naming neither the key nor its value
    ({"num_key_value_heads": -2}, "num_key_value_heads is -2, not a positive integer"),
    ({"head_dim": "16"}, "head_dim is '16', not a positive integer"),
])
def test_a_config_json_size_names_its_key_and_value(tmp_path: Path, changes: dict[str, object], said: str) -> None:
    model = write_model(tmp_path)
    hf = json.loads((model / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            del hf[key]
        else:
            hf[key] = value
    (model / "config.json").write_text(json.dumps(hf))
    result = check(["--model", str(model), *CPU])
    assert_invalid(result, "--model", f"config.json: {said}; use the checkpoint's original config.json")


def test_a_quantization_config_without_quant_method_says_so(tmp_path: Path) -> None:
    model = write_model(tmp_path, quantization_config={"fmt": "e4m3", "weight_block_size": [128, 128],
                                                       "activation_scheme": "dynamic"})
    result = check(["--model", str(model), *CPU])
    assert_invalid(result, "--model", "quantization_config names no quant_method")  # was "quant_method None"
    assert "None" not in result.output


def test_a_model_named_on_one_yaml_line_is_answered_with_the_form_to_write(tmp_path: Path) -> None:
    result = check([str(write_yaml(tmp_path, "model: tiny\n")), *CPU])
    assert_invalid(result, "model", "got the string 'tiny'; write `model: {path: tiny}`")


def test_overlapping_port_ranges_collide(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "instances:\n  - {role: prefill, base_port: 18801}\n"
                                "  - {role: decode, base_port: 18800, count: 2}\n")
    result = check([str(path), "--model", "tiny", *CPU])
    assert_invalid(result, "instances[1].base_port", "ports 18800-18801 (decode HTTP) collide with "
                                                     "instances[0].base_port port 18801 (prefill HTTP)")


def test_the_memory_table_says_what_its_kv_column_counts() -> None:
    """With --num-gpu-blocks the KV column counts those blocks, not one max_model_len sequence as
    the table's title said."""
    fixed = check(["--model", "tiny", *CPU, "--num-gpu-blocks", "1000"])
    assert fixed.exit_code == 0, fixed.output
    assert "memory estimate per TP rank (weights + KV of cache.num_gpu_blocks)" in fixed.output
    sized = check(["--model", "tiny", *CPU])
    assert "memory estimate per TP rank (weights + KV of one max_model_len sequence)" in sized.output


def test_vllms_several_served_model_names_get_the_yaml_list(tmp_path: Path) -> None:
    """vLLM's `--served-model-name a b` takes both; here `b` was reported as neither a model nor a config file,
    with nothing about the names."""
    result = check(["--model", "tiny", *CPU, "--served-model-name", "alias-a", "alias-b"])
    assert_invalid(result, "MODEL", "'alias-b' is neither a model nor a config file")
    assert "--served-model-name takes one: list several in the YAML file, `model: {served_model_name: [A, B]}`" \
        in " ".join(result.output.split())
    listed = write_yaml(tmp_path, "model: {path: tiny, served_model_name: [alias-a, alias-b]}\n")
    assert check([str(listed), *CPU]).exit_code == 0


@pytest.mark.skipif(cuda_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["serve", "check-config", "smoke"])
def test_cuda_where_there_is_none_names_a_fix_the_command_has(command: str, tmp_path: Path) -> None:
    """serve and smoke were told to "declare the GPU host with --target-gpus N --target-gpu-memory GIB", options
    only check-config has (`No such option: --target-gpus`)."""
    result = invoke([command, "--model", "tiny", "--device", "cuda", "--log-dir", str(tmp_path / "logs")])
    assert result.exit_code == 1, result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("error: --device:")]
    assert line == ("error: --device: cuda requested but no CUDA device is visible on this machine; use --device cpu, "
                    "or a machine with a CUDA GPU (`pdlaunch check-config --target-gpus N --target-gpu-memory GIB` "
                    "checks a GPU host's deployment from here)")


def test_a_fractional_count_reads_once(tmp_path: Path) -> None:
    """It read "input should be a valid integer, got a number with a fractional part, got 1.5"."""
    path = write_yaml(tmp_path, "instances:\n  - {role: prefill, count: 1.5}\n  - {role: decode}\n")
    result = check([str(path), "--model", "tiny", *CPU])
    assert_invalid(result, "instances[0].count", "input should be a valid integer, got a number with a fractional "
                                                 "part; it is 1.5")
