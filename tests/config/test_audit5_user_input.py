"""Audit 5 of user input, through the real CLI: click's usage errors exit 1 like every bad input, a flag given
twice with different values is refused naming both, a YAML boolean is not read as a number, every count and
timeout has an upper bound, JSON nested past Python's stack in a checkpoint names its file, and a blank secret
or a negative device index is refused."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from pdlaunch.cli import app
from pdlaunch.config.problems import with_article
from tests.config.cli_helpers import assert_invalid, write_model, write_yaml

CPU = ["--model", "tiny", "--device", "cpu"]
MAX_SEQS, MAX_TOKENS, MAX_SECONDS = 16384, 2**24, 7 * 24 * 3600  # the bounds the field descriptions state
NESTED = "[" * 100_000 + "]" * 100_000  # past Python's recursion limit, within every size limit


def run(args: list[str], env: dict[str, str | None] | None = None) -> Result:
    """`pdlaunch ARGS` at 1000 columns (click's usage box keeps each message on one line)."""
    result = CliRunner().invoke(app, args, env={"COLUMNS": "1000", **(env or {})}, terminal_width=1000)
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


# --- 1. usage errors exit 1 -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "said"), [
    (["serve", "--port", "abc"], "Invalid value for '--port'"),
    (["check-config", "--port", "abc"], "Invalid value for '--port'"),
    (["smoke", "--tp", "two"], "Invalid value for '--tp'"),
    (["generate", "--max-tokens", "abc"], "Invalid value for '--max-tokens'"),
    (["bench", "serve", "--base-url", "http://127.0.0.1:1", "--num-prompts", "abc"],
     "Invalid value for '--num-prompts'"),
    (["render", "kubernetes", "--out", "o", "--image", "i", "--gpus-per-node", "abc"],
     "Invalid value for '--gpus-per-node'"),
    (["check-config", "--porrt", "8000"], "No such option: --porrt (Possible options: --host, --port)"),
    (["serve", "--max-num-seq", "8"], "No such option: --max-num-seq"),
    (["generate", "--max-token", "8"], "No such option: --max-token"),
    (["bench", "compare", "--ratez", "2"], "No such option: --ratez"),
    (["config", "schema", "--json"], "No such option: --json"),
    (["servee"], "No such command 'servee'"),
    (["bench", "serve"], "Missing option '--base-url'"),
])
def test_a_usage_error_exits_1_with_clicks_message(args: list[str], said: str) -> None:
    result = run(args)
    assert result.exit_code == 1, result.output
    assert said in result.output and "-h' for help" in result.output, result.output


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"], ["bench", "serve", "-h"], ["config", "-h"]])
def test_help_still_exits_0(args: list[str]) -> None:
    assert run(args).exit_code == 0


# --- 2. a flag given twice ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "said"), [
    (["check-config", *CPU, "--port", "1", "--port", "2"],
     "--port was given 2 times, with different values ('1', '2'), and takes one value: give --port once"),
    (["check-config", "--model", "a", "--device", "cpu", "--model=b"], "--model was given 2 times, with different "
                                                                         "values ('a', 'b')"),
    (["generate", "--model", "a", "--model", "b"], "--model was given 2 times, with different values ('a', 'b')"),
    (["check-config", *CPU, "--target-gpus", "2", "--target-gpus", "4"], "--target-gpus was given 2 times"),
    (["bench", "serve", "--base-url", "http://a", "--base-url", "http://b"], "--base-url was given 2 times"),
    (["bench", "serve", "--base-url", "http://a", "--ignore-eos", "--no-ignore-eos"],
     "--ignore-eos was given as --ignore-eos and --no-ignore-eos, which contradict each other"),
])
def test_a_single_valued_flag_given_twice_names_both_values(args: list[str], said: str) -> None:
    result = run(args)
    assert result.exit_code == 1, result.output
    assert said in result.output, result.output


def test_a_flag_repeated_with_the_same_value_or_meant_to_repeat_is_fine() -> None:
    assert run(["check-config", *CPU, "--port", "8005", "--port=8005"]).exit_code == 0
    assert run(["check-config", *CPU, "--json", "--json"]).exit_code == 0
    # a value that looks like a flag is the value of the flag before it, as click reads it
    result = run(["generate", *CPU, "--max-tokens", "1", "--prompt", "--max-tokens", "--prompt", "hi", "--json"])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["prompt"] for line in result.stdout.splitlines()] == ["--max-tokens", "hi"]


# --- 3. a boolean where a number goes -------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "field"), [
    ("proxy: {port: true}\n", "proxy.port"),
    ("instances: [{role: prefill, count: true}, {role: decode}]\n", "instances[0].count"),
    ("cache: {gpu_memory_utilization: yes}\n", "cache.gpu_memory_utilization"),
    ("scheduler: {max_num_seqs: on}\n", "scheduler.max_num_seqs"),
    ("model: {seed: false}\n", "model.seed"),
    ("parallel: {nodes: [{address: 127.0.0.1, devices: [0, true]}]}\n", "parallel.nodes[0].devices"),
    ("launcher: {backend: ray, ray_resources: {prefill: {pd_prefill: true}}}\n", "launcher.ray_resources.prefill"),
])
def test_a_yaml_boolean_is_not_read_as_a_number(tmp_path: Path, text: str, field: str) -> None:
    assert_invalid(run(["check-config", str(write_yaml(tmp_path, text)), *CPU]), field, "a boolean is not a number")


def test_number_flags_and_boolean_keys_still_read() -> None:
    result = run(["check-config", *CPU, "--port", "8005", "--decode", "2", "--max-num-seqs", "8",
                  "--enforce-eager", "--no-enable-prefix-caching", "--json"])
    assert result.exit_code == 0, result.output
    config = json.loads(result.stdout)["config"]
    assert config["proxy"]["port"] == 8005 and config["scheduler"]["max_num_seqs"] == 8
    assert config["model"]["enforce_eager"] is True and config["cache"]["enable_prefix_caching"] is False


# --- 4. upper bounds ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "field", "bound"), [
    (f"scheduler: {{max_num_seqs: {10**100}}}\n", "scheduler.max_num_seqs", MAX_SEQS),  # a batch ladder loop
    (f"scheduler: {{max_num_batched_tokens: {10**100}}}\n", "scheduler.max_num_batched_tokens", MAX_TOKENS),
    (f"scheduler: {{prompt_tokens_while_decoding: {10**100}}}\n", "scheduler.prompt_tokens_while_decoding",
     MAX_TOKENS),
    (f"cache: {{num_gpu_blocks: {10**100}}}\n", "cache.num_gpu_blocks", 2**24),
    (f"model: {{max_model_len: {10**100}}}\n", "model.max_model_len", MAX_TOKENS),
    (f"security: {{max_request_bytes: {10**100}}}\n", "security.max_request_bytes", 2**30),
    (f"proxy: {{disaggregate_min_tokens: {10**100}}}\n", "proxy.disaggregate_min_tokens", MAX_TOKENS),
    (f"proxy: {{disaggregate_min_tokens: 8, disaggregate_max_queue_tokens: {10**100}}}\n",
     "proxy.disaggregate_max_queue_tokens", MAX_TOKENS),
    ("proxy: {disaggregate_min_tokens: 8, disaggregate_max_itl_ms: 1.0e+300}\n", "proxy.disaggregate_max_itl_ms",
     60000),
    ("proxy: {request_timeout_seconds: 1.0e+300}\n", "proxy.request_timeout_seconds", MAX_SECONDS),
    ("proxy: {prefill_timeout_seconds: 1.0e+300}\n", "proxy.prefill_timeout_seconds", MAX_SECONDS),
    ("kv_transfer: {kv_lease_seconds: 1.0e+300}\n", "kv_transfer.kv_lease_seconds", MAX_SECONDS),
    ("kv_transfer: {handshake_timeout_seconds: 1.0e+300}\n", "kv_transfer.handshake_timeout_seconds", MAX_SECONDS),
    ("kv_transfer: {transfer_timeout_seconds: 1.0e+300}\n", "kv_transfer.transfer_timeout_seconds", MAX_SECONDS),
    ("supervision: {restart_backoff_seconds: 1.0e+300}\n", "supervision.restart_backoff_seconds", MAX_SECONDS),
    ("supervision: {role_down_grace_seconds: 1.0e+300}\n", "supervision.role_down_grace_seconds", MAX_SECONDS),
    ("supervision: {stall_restart_seconds: 1.0e+300}\n", "supervision.stall_restart_seconds", MAX_SECONDS),
    ("launcher: {backend: ray, ray_placement_timeout_seconds: 1.0e+300}\n",
     "launcher.ray_placement_timeout_seconds", MAX_SECONDS),
])
def test_a_huge_value_is_refused_with_its_bound(tmp_path: Path, text: str, field: str, bound: int) -> None:
    assert_invalid(run(["check-config", str(write_yaml(tmp_path, text)), *CPU]), field, f"must be <= {bound}")


def test_a_huge_flag_value_names_the_flag() -> None:
    assert_invalid(run(["check-config", *CPU, "--max-num-seqs", str(10**100)]), "--max-num-seqs",
                   f"must be <= {MAX_SEQS}")
    assert run(["check-config", *CPU, "--max-num-seqs", str(MAX_SEQS)]).exit_code == 0


# --- 5. JSON nested too deeply in a checkpoint ----------------------------------------------------------------

@pytest.mark.parametrize(("name", "text"), [
    ("tokenizer_config.json", NESTED),
    ("generation_config.json", NESTED),
    ("model.safetensors.index.json", '{"weight_map": ' + NESTED + "}"),
])
def test_a_checkpoint_json_nested_too_deeply_names_the_file(tmp_path: Path, name: str, text: str) -> None:
    model = write_model(tmp_path)
    (model / name).write_text(text)
    for command in (["check-config", "--model", str(model), "--device", "cpu"],
                    ["generate", "--model", str(model), "--device", "cpu", "--max-tokens", "1"]):
        assert_invalid(run(command), "--model", f"cannot read {model / name}: its JSON nests too deeply")


def test_a_safetensors_header_nested_too_deeply_is_a_corrupt_file(tmp_path: Path) -> None:
    model = write_model(tmp_path)
    header = ('{"a": ' + NESTED + "}").encode()
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    assert_invalid(run(["check-config", "--model", str(model), "--device", "cpu"]), "--model",
                   f"{model / 'model.safetensors'} has a header that is not valid JSON")


# --- 6. secrets, device indices, articles ---------------------------------------------------------------------

@pytest.mark.parametrize(("args", "env", "field"), [
    ([], {"PDLAUNCH_API_KEY": "   "}, "PDLAUNCH_API_KEY"),
    (["--api-key", " \t"], {}, "--api-key"),
])
def test_a_blank_api_key_is_refused_naming_where_it_came_from(args: list[str], env: dict[str, str | None],
                                                              field: str) -> None:
    assert_invalid(run(["check-config", *CPU, *args], env), field, "whitespace characters are not a secret")


def test_a_blank_secret_in_the_file_is_refused(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, f"security: {{api_key: ' ', deployment_secret: '{' ' * 20}'}}\n")
    path.chmod(0o600)
    result = run(["check-config", str(path), *CPU])
    assert_invalid(result, "security.api_key", "1 whitespace characters are not a secret")
    assert_invalid(result, "security.deployment_secret", "20 whitespace characters are not a secret")


def test_an_empty_api_key_variable_is_refused_not_ignored() -> None:
    assert_invalid(run(["check-config", *CPU], {"PDLAUNCH_API_KEY": ""}), "PDLAUNCH_API_KEY",
                   "is set but empty, so it would be ignored; set it to the value of --api-key, or unset it")
    assert run(["check-config", *CPU, "--api-key", "k"], {"PDLAUNCH_API_KEY": ""}).exit_code == 0
    assert run(["check-config", *CPU], {"PDLAUNCH_API_KEY": "k"}).exit_code == 0


@pytest.mark.parametrize(("text", "field"), [
    ("parallel: {nodes: [{address: 127.0.0.1, devices: [-1]}]}\n", "parallel.nodes[0].devices[0]"),
    ("instances: [{role: prefill, devices: [0, -2]}, {role: decode}]\n", "instances[0].devices[1]"),
])
def test_a_negative_device_index_is_refused(tmp_path: Path, text: str, field: str) -> None:
    assert_invalid(run(["check-config", str(write_yaml(tmp_path, text)), *CPU]), field, "must be >= 0, got -")


def test_a_yaml_file_of_one_value_says_an_int() -> None:
    assert with_article("int") == "an int" and with_article("list") == "a list"


def test_a_yaml_file_of_one_int_is_named_with_its_article(tmp_path: Path) -> None:
    assert_invalid(run(["check-config", str(write_yaml(tmp_path, "8000\n")), *CPU]), "config",
                   "holds an int, not a mapping of keys")
