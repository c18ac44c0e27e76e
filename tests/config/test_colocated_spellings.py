"""`colocated` written as any value the field reads as true (YAML's true, and the 1, "yes", "on" pydantic takes for a
boolean) implies what `colocated: true` implies: one colocated instance when the file lists no groups, and that group
for the count flags to set. Before, only YAML's true did, and `colocated: 1` was refused for prefill and decode groups
the user never wrote."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.config.cli_helpers import check, check_json, write_yaml

CPU = ["--model", "tiny", "--device", "cpu"]


@pytest.mark.parametrize("spelling", ["true", "1", "'yes'", "'on'", "'true'"])
def test_every_true_spelling_makes_one_colocated_instance(tmp_path: Path, spelling: str) -> None:
    config = write_yaml(tmp_path, f"colocated: {spelling}\n")
    report = check_json([*CPU, str(config)])
    assert report["valid"], report["problems"]
    assert [(g["role"], g["count"]) for g in report["config"]["instances"]] == [("colocated", 1)]


@pytest.mark.parametrize("spelling", ["0", "'no'", "false"])
def test_false_spellings_keep_prefill_and_decode(tmp_path: Path, spelling: str) -> None:
    report = check_json([*CPU, str(write_yaml(tmp_path, f"colocated: {spelling}\n"))])
    assert report["valid"], report["problems"]
    assert [g["role"] for g in report["config"]["instances"]] == ["prefill", "decode"]


def test_a_value_that_is_no_boolean_is_refused_by_its_field(tmp_path: Path) -> None:
    result = check([*CPU, str(write_yaml(tmp_path, "colocated: maybe\n"))])
    assert result.exit_code == 1
    assert any(line.startswith("error: colocated:") for line in result.output.splitlines()), result.output


def test_a_count_flag_meets_the_same_groups_as_with_true(tmp_path: Path) -> None:
    """--prefill N on a colocated file: the one refusal `colocated: true` gets, not one for a decode group too."""
    expected = check_json([*CPU, str(write_yaml(tmp_path, "colocated: true\n")), "--prefill", "2"])["problems"]
    found = check_json([*CPU, str(write_yaml(tmp_path, "colocated: 1\n")), "--prefill", "2"])["problems"]
    assert found == expected and len(expected) == 1, found
