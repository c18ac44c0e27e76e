"""load_deployment / load_valid_deployment: precedence, overrides, problems per field, example."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.loader import example_yaml, load_deployment, load_valid_deployment
from pdlaunch.errors import ConfigError
from tests.config.cli_helpers import invoke, write_yaml


def _problems(path: Path | None, overrides: dict) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load_deployment(path, overrides)
    return list(info.value.problems)


def test_defaults_then_file_then_flags(tmp_path: Path) -> None:
    assert load_deployment(None, {}).cache.block_size == 16
    path = write_yaml(tmp_path, "cache: {block_size: 32}\nproxy: {port: 9000}\n")
    from_file = load_deployment(path, {})
    assert (from_file.cache.block_size, from_file.proxy.port) == (32, 9000)
    flagged = load_deployment(path, {"cache.block_size": 64})
    assert (flagged.cache.block_size, flagged.proxy.port) == (64, 9000)


def test_role_count_override_sets_existing_group_and_creates_missing(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "instances:\n  - {role: prefill, count: 1, tp: 2}\n")
    cfg = load_deployment(path, {"instances[prefill].count": 3, "instances[decode].count": 2})
    groups = [(g.role, g.count, g.tp) for g in cfg.instances]
    assert groups == [("prefill", 3, 2), ("decode", 2, None)]
    assert [(g.role, g.count) for g in load_deployment(None, {"instances[decode].count": 4}).instances] == [
        ("prefill", 1), ("decode", 4)]


def test_role_count_override_is_ambiguous_with_two_groups(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "instances:\n  - {role: prefill}\n  - {role: prefill, node: 1}\n  - {role: decode}\n")
    problems = _problems(path, {"instances[prefill].count": 2})
    assert problems[0][0] == "instances" and "--prefill" in problems[0][1]


def test_colocated_without_instances_is_one_colocated_instance() -> None:
    cfg = load_deployment(None, {"colocated": True})
    assert [(g.role, g.count) for g in cfg.instances] == [("colocated", 1)]


def test_unknown_keys_get_did_you_mean(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "cache:\n  blok_size: 16\nblock_size: 8\nmodle: {path: tiny}\n")
    problems = dict(_problems(path, {}))
    assert "did you mean `block_size`" in problems["cache.blok_size"]
    assert "did you mean `cache.block_size`" in problems["block_size"]
    assert "did you mean `model`" in problems["modle"]


def test_every_field_error_is_reported_with_its_path(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "instances:\n  - {role: prefill, count: -1}\n  - {role: dekode}\n"
                      "cache: {gpu_memory_utilization: 2}\nproxy: {port: eighty}\n")
    fields = [field for field, _ in _problems(path, {})]
    assert sorted(fields) == sorted(["instances[0].count", "instances[1].role", "cache.gpu_memory_utilization",
                                     "proxy.port"])


def test_flag_value_errors_name_the_flag() -> None:
    problems = dict(_problems(None, {"kv_transfer.transfer_mode": "pul"}))
    assert "'pull'" in problems["--transfer-mode"]


def test_yaml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "model:\n  path: tiny\n   dtype: float32\n")
    (field, message), = _problems(path, {})
    assert field == "config" and str(path) in message and "line 3" in message and "column" in message


def test_a_surrogate_pair_escape_reads_as_its_character(tmp_path: Path) -> None:
    """JSON writes a character past U+FFFF as a UTF-16 pair of escapes (`"\\ud83d\\ude00"`), which YAML's double
    quotes take too: PyYAML read it as two lone surrogates, which no file, log or terminal can hold."""
    path = write_yaml(tmp_path, 'model: {served_model_name: ["\\ud83d\\ude00 bot"]}\n')
    assert load_deployment(path, {}).model.served_model_name == ["\U0001F600 bot"]


def test_a_lone_surrogate_escape_is_a_problem_not_a_traceback(tmp_path: Path) -> None:
    """`"\\ud800"` alone is no character: check-config printed the summary with it and died on a UnicodeEncodeError."""
    path = write_yaml(tmp_path, 'model:\n  path: "x\\ud800"\n')
    (field, message), = _problems(path, {})
    assert field == "model.path" and "line 2, column 9" in message, message
    assert "'x\\ud800'" in message and "lone UTF-16 surrogate" in message, message
    result = invoke(["check-config", str(path), "--device", "cpu"])
    assert result.exit_code == 1 and "error: model.path: " in result.output, result.output


def test_non_mapping_file_and_missing_file(tmp_path: Path) -> None:
    assert "not a mapping" in _problems(write_yaml(tmp_path, "- a\n- b\n"), {})[0][1]
    assert "does not exist" in _problems(tmp_path / "nope.yaml", {})[0][1]


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    exclude = {"kv_transfer": {"engine_id"}}  # a fresh uuid per load
    from_empty = load_deployment(write_yaml(tmp_path, ""), {}).model_dump(exclude=exclude)
    assert from_empty == load_deployment(None, {}).model_dump(exclude=exclude)


def test_load_valid_deployment_raises_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        load_valid_deployment(None, {"model.path": "tiny", "device": "cpu", "cache.block_size": 12,
                                     "model.enable_cumem_allocator": True, "instances[decode].count": 0})
    fields = {field for field, _ in info.value.problems}
    assert fields == {"--block-size", "--enable-cumem-allocator", "instances"}


def test_load_valid_deployment_returns_resolved_config() -> None:
    cfg = load_valid_deployment(None, {"model.path": "tiny", "device": "cpu", "parallel.tp": 2})
    assert cfg.device == "cpu" and cfg.model.dtype == "float32"
    assert [(g.role, g.tp) for g in cfg.instances] == [("prefill", 2), ("decode", 2)]
    assert cfg.model.max_model_len is not None


def test_example_yaml_parses_and_validates(tmp_path: Path) -> None:
    text = example_yaml()
    assert "#" in text
    DeploymentConfig.model_validate(yaml.safe_load(text))
    result = invoke(["config", "example"])
    assert result.exit_code == 0
    path = write_yaml(tmp_path, result.stdout)
    assert invoke(["check-config", str(path), "--device", "cpu"]).exit_code == 0


def test_config_schema_lists_every_section() -> None:
    import json

    schema = json.loads(invoke(["config", "schema"]).stdout)
    assert {"model", "cache", "parallel", "kv_transfer", "proxy", "instances"} <= set(schema["properties"])
