"""Bad input to `pdlaunch generate`, `smoke` and `config`, typed as a user types it: one message naming
the flag, what is wrong and how to fix it; exit code 1; never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result

from tests.config.cli_helpers import invoke

TINY_ANY_LENGTH = ["generate", "--model", "tiny", "--device", "cpu"]
TINY = [*TINY_ANY_LENGTH, "--max-tokens", "2"]


def assert_names(result: Result, flag: str, text: str | None = None) -> None:
    """Exit 1 and an error line about `flag` (containing `text`)."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.startswith(f"error: {flag}:")]
    assert lines, f"no error about {flag} in:\n{result.output}"
    if text is not None:
        assert any(text in line for line in lines), f"{text!r} not in {lines}"


@pytest.mark.parametrize(("flag", "value", "allowed"), [
    ("--dtype", "float8", "bfloat16"), ("--quantization", "int4", "fp8"), ("--kv-cache-dtype", "int8", "fp8"),
    ("--device", "gpu", "cuda")])
def test_generate_unknown_choice_is_named_not_a_validation_traceback(flag: str, value: str, allowed: str) -> None:
    args = [*TINY, flag, value]
    if flag == "--device":
        args.remove("--device")
        args.remove("cpu")
    assert_names(invoke(args), flag, allowed)


def test_generate_float16_on_cpu_is_refused_as_check_config_refuses_it() -> None:
    assert_names(invoke([*TINY, "--dtype", "float16"]), "--dtype", "not supported on CPU")


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_generate_temperature_not_finite_says_so(value: str) -> None:
    assert_names(invoke([*TINY, "--temperature", value]), "--temperature", "finite")


def test_generate_max_tokens_past_int32_gives_the_range() -> None:
    assert_names(invoke([*TINY_ANY_LENGTH, "--max-tokens", "3000000000"]), "--max-tokens", "2147483647")


def test_generate_max_tokens_past_the_context_names_max_tokens() -> None:
    assert_names(invoke([*TINY_ANY_LENGTH, "--max-tokens", "99999999"]), "--max-tokens", "2048")


@pytest.mark.slow
def test_generate_prompt_past_the_context_names_prompt() -> None:
    result = invoke([*TINY, "--prompt", "hello " * 2100])
    assert_names(result, "--prompt", "exceeds max_model_len 2048")
    assert "--max-tokens" in result.output


def _file(root: Path) -> Path:
    (root / "weights.txt").write_text("not a model")
    return root / "weights.txt"


def _empty(root: Path) -> Path:
    (root / "empty").mkdir()
    return root / "empty"


def _broken(root: Path) -> Path:
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text("{not json")
    return root / "broken"


def _fake_gguf(root: Path) -> Path:
    (root / "model.gguf").write_bytes(b"not a gguf file")
    return root / "model.gguf"


@pytest.mark.parametrize(("make", "text"), [(_file, "is a file, not a directory"), (_empty, "no config.json"),
                                            (_broken, "not valid JSON"), (_fake_gguf, "GGUF")])
def test_generate_bad_model_path_names_model(tmp_path: Path, make: Callable[[Path], Path], text: str) -> None:
    args = [*TINY]
    args[args.index("tiny")] = str(make(tmp_path))
    assert_names(invoke(args), "--model", text)


def test_generate_cuda_without_cuda_names_device() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is visible here")
    result = invoke(["generate", "--model", "tiny", "--device", "cuda", "--max-tokens", "2"])
    assert_names(result, "--device", "no CUDA device")
    assert "--target-gpus" not in result.output  # a check-config flag that generate does not have


def test_smoke_max_model_len_too_short_for_its_requests_is_refused_before_starting(tmp_path: Path) -> None:
    result = invoke(["smoke", "--model", "tiny", "--device", "cpu", "--max-model-len", "16",
                     "--log-dir", str(tmp_path / "logs")])
    assert result.exit_code == 1 and "--max-model-len" in result.output, result.output
    assert "smoke: PD deployment" not in result.output  # nothing was started
    assert not (tmp_path / "logs").exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("command", ["example", "schema"])
def test_config_output_to_a_full_disk_is_a_message(command: str) -> None:
    code = "from pdlaunch.cli import main; main()"
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-c", code, "config", command], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "error: stdout:" in done.stderr, done.stderr
    assert "No space left" in done.stderr


def test_config_example_and_schema_still_print() -> None:
    assert "instances:" in invoke(["config", "example"]).output
    assert "properties" in json.loads(invoke(["config", "schema"]).output)


def test_generate_takes_the_model_as_its_first_argument_as_serve_does() -> None:
    result = invoke(["generate", "tiny", "--device", "cpu", "--max-tokens", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert invoke(["generate", "tiny", "--model", "tiny", "--device", "cpu", "--max-tokens", "2"]).exit_code == 0
    assert_names(invoke(["generate", "tiny", "--model", "demo", "--device", "cpu"]), "--model", "two models")


def test_kv_cache_dtype_takes_vllms_fp8_e4m3_and_says_why_e5m2_is_refused() -> None:
    assert invoke([*TINY, "--kv-cache-dtype", "fp8_e4m3"]).exit_code == 0
    assert_names(invoke([*TINY, "--kv-cache-dtype", "fp8_e5m2"]), "--kv-cache-dtype", "the FP8 KV cache is e4m3")
