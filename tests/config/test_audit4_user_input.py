"""Audit 4 of user input: YAML values, flag values and JSON that once left as a traceback (or took minutes)
now end as one problem naming the key path or flag, exit 1."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from pydantic import ValidationError

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.errors_format import problems_from_validation_error
from tests.config.cli_helpers import assert_invalid, check, write_yaml

CPU = ["--model", "tiny", "--device", "cpu"]


@pytest.mark.parametrize(("text", "field", "said"), [
    ("proxy: {port: !!int abc}\n", "proxy.port", "'abc' in"),
    ("cache: {gpu_memory_utilization: !!float half}\n", "cache.gpu_memory_utilization", "is not a number"),
    ("colocated: !!bool maybe\n", "colocated", "is not a boolean"),
    ("log_dir: !!timestamp 2001-13-45\n", "log_dir", "month must be in 1..12"),
    ("instances:\n  - role: prefill\n    count: !!int two\n", "instances[0].count", "at line 3, column 12"),
    ("proxy: {port: " + "9" * 5000 + "}\n", "proxy.port", "more than 4000 digits"),
    ("model: {seed: 0x" + "f" * 5000 + "}\n", "model.seed", "more than 4000 digits"),  # hex has no length limit
])
def test_yaml_value_its_tag_cannot_read_names_the_key(tmp_path: Path, text: str, field: str, said: str) -> None:
    assert_invalid(check([str(write_yaml(tmp_path, text)), *CPU]), field, said)


def test_a_yaml_alias_bomb_in_a_typed_field_is_reported_without_printing_it_whole() -> None:
    """Nine aliases of nine aliases, seven deep (4.8M items from a few hundred bytes of YAML): the problem shows
    the value's first characters; formatting it once printed it whole (tens of MB here; at ten deep, minutes
    and GBs)."""
    bomb: object = ["lol"] * 9
    for _ in range(6):
        bomb = [bomb] * 9
    with pytest.raises(ValidationError) as caught:
        DeploymentConfig.model_validate({"parallel": {"tp": bomb}})
    tracemalloc.start()
    try:
        problems = problems_from_validation_error(caught.value)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert problems[0].field == "parallel.tp" and "[[[" in problems[0].message
    assert peak < 5 * 2**20, f"formatting the problem allocated {peak / 2**20:.0f} MiB"


def test_alias_bomb_through_check_config(tmp_path: Path) -> None:
    anchors = "x0: &x0 [lol, lol, lol]\n" + "".join(f"x{i + 1}: &x{i + 1} [*x{i}, *x{i}, *x{i}]\n" for i in range(5))
    result = check([str(write_yaml(tmp_path, anchors + "log_dir: *x5\n")), *CPU])
    assert_invalid(result, "log_dir", "input should be a valid string, got [[[")
    assert_invalid(result, "x0", "unknown key")


@pytest.mark.parametrize(("text", "said"), [
    ("[" * 100_000 + "]" * 100_000, "nests too deeply"),
    ('{"kv_connector": "NixlConnector", "kv_port": ' + "9" * 5000 + "}", "5000 digits"),
])
def test_kv_transfer_config_json_python_cannot_read_names_the_flag(text: str, said: str) -> None:
    result = check([*CPU, "--kv-transfer-config", text])
    assert_invalid(result, "--kv-transfer-config", said)
    assert "set_int_max_str_digits" not in result.output


@pytest.mark.parametrize(("text", "said"), [
    ("[" * 100_000 + "]" * 100_000, "nests too deeply"),
    ('{"hidden_size": ' + "9" * 5000 + "}", "5000 digits"),
])
def test_a_config_json_python_cannot_read_names_the_model(tmp_path: Path, text: str, said: str) -> None:
    (tmp_path / "config.json").write_text(text)
    result = check(["--model", str(tmp_path), "--device", "cpu"])
    assert_invalid(result, "--model", said)
    assert "set_int_max_str_digits" not in result.output


@pytest.mark.parametrize(("args", "flag", "said"), [
    (["--target-gpus", str(10**100), "--target-gpu-memory", "80"], "--target-gpus", "must be 1..16384"),
    (["--target-gpus", "2", "--target-gpu-memory", "1e300"], "--target-gpu-memory", "up to 1048576"),
    (["--kv-offload-gb", "1e300"], "--kv-offload-gb", "must be <= 1048576"),  # its bytes: int(inf) at serve
])
def test_sizes_too_large_to_count_in_bytes_name_the_flag(args: list[str], flag: str, said: str) -> None:
    assert_invalid(check(["--model", "tiny", *args]), flag, said)


def test_a_cpu_kv_cache_too_large_to_count_in_bytes_names_the_key(tmp_path: Path) -> None:
    result = check([str(write_yaml(tmp_path, "cache: {cpu_kv_cache_gb: 1e300}\n")), *CPU])
    assert_invalid(result, "cache.cpu_kv_cache_gb", "must be <= 1048576")


@pytest.mark.parametrize(("args", "field"), [
    (["--model", "", "--device", "cpu"], "--model"),  # `--model "$MODEL"` with MODEL unset
    (["", "--device", "cpu"], "MODEL"),
    (["--model", " ", "--device", "cpu"], "--model"),
])
def test_an_empty_model_names_no_model_rather_than_the_working_directory(args: list[str], field: str) -> None:
    result = check(args)
    assert_invalid(result, field, "names no model")
    assert "config.json" not in result.output.split("names no model")[0]


def test_a_flag_that_replaces_a_file_value_is_a_warning_naming_both(tmp_path: Path) -> None:
    config = str(write_yaml(tmp_path, "proxy: {port: 8006}\ninstances: [{role: prefill}, {role: decode, count: 1}]\n"))
    result = check([config, *CPU, "--port", "8005", "--decode", "2"])
    assert result.exit_code == 0, result.output
    assert f"warning: --port: sets proxy.port to 8005, replacing 8006 in {config!r}: flags win" in result.output
    assert "warning: --decode: sets instances[1].count to 2, replacing 1" in result.output
    assert "warning: --port" not in check([config, *CPU, "--port", "8006"]).output  # the same value: nothing to say


def test_a_secret_replaced_by_its_environment_variable_is_named_not_shown(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_yaml(tmp_path, "security: {api_key: file-key-1234}\n")
    config.chmod(0o600)
    monkeypatch.setenv("PDLAUNCH_API_KEY", "env-key-5678")
    result = check([str(config), *CPU])
    assert "warning: PDLAUNCH_API_KEY: sets security.api_key, replacing" in result.output
    assert "the environment wins over the file" in result.output
    assert "key-1234" not in result.output and "key-5678" not in result.output


def test_serve_logs_the_same_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from pdlaunch.config.cli_overrides import Overrides
    from pdlaunch.config.loader import load_valid_deployment

    overrides = Overrides()
    for path, value, flag in (("model.path", "tiny", "--model"), ("device", "cpu", "--device"),
                              ("proxy.port", 8005, "--port")):
        overrides.set(path, value, flag)
    with caplog.at_level("WARNING"):
        load_valid_deployment(write_yaml(tmp_path, "proxy: {port: 8006}\n"), overrides)
    assert "--port: sets proxy.port to 8005, replacing 8006" in caplog.text


@pytest.mark.parametrize("args", [
    ["--kv-transfer-config", "[" * 100_000],  # json's own recursion, in a fresh interpreter
    ["--target-gpus", str(10**100), "--target-gpu-memory", "80"],
])
def test_as_a_process_bad_input_exits_1_without_a_traceback(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "pdlaunch", "check-config", *CPU, *args], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert f"error: {args[0]}:" in done.stdout
