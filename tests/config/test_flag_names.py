"""A problem names what the user typed: the flag for a flag-set value, the YAML key for a file value."""

from __future__ import annotations

from pathlib import Path

from tests.config.cli_helpers import assert_invalid, check, check_json, invoke, write_yaml

CPU = ["--model", "tiny", "--device", "cpu"]


def test_prefill_flag_is_named_not_the_group_it_lands_in() -> None:
    result = check([*CPU, "--prefill", "-1"])
    assert_invalid(result, "--prefill", "must be >= 0, got -1")
    assert "instances[0]" not in result.output
    assert [p["field"] for p in check_json([*CPU, "--prefill", "-1"])["problems"]] == ["--prefill"]


def test_decode_flag_in_a_file_with_several_groups(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "instances:\n  - {role: prefill}\n  - {role: decode}\n")
    assert_invalid(check([str(path), *CPU, "--decode", "-3"]), "--decode", "must be >= 0")


def test_the_same_value_from_the_file_names_the_yaml_key(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "instances:\n  - {role: prefill, count: -1}\n  - {role: decode}\n")
    assert_invalid(check([str(path), *CPU]), "instances[0].count", "must be >= 0")


def test_rule_problems_on_flag_values_name_the_flag_too(tmp_path: Path) -> None:
    assert_invalid(check([*CPU, "--max-model-len", "100000"]), "--max-model-len", "max_position_embeddings")
    path = write_yaml(tmp_path, "model: {max_model_len: 100000}\n")
    assert_invalid(check([str(path), "--device", "cpu"]), "model.max_model_len")


def test_serve_prints_the_same_line() -> None:
    served = invoke(["serve", *CPU, "--prefill", "-1"])
    assert served.exit_code == 1
    assert "error: --prefill: must be >= 0, got -1" in served.output
