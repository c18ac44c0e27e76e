"""A TP size set by a flag (or a deployment-wide YAML key) reaches every instance group through resolution: its
problems name that flag or key, each message once, not `instances[i].tp` once per group (a field the user never
wrote, the same text twice). A group that sets its own `tp` keeps its `instances[i].tp`. The same for a KV cache
dtype a group takes from --kv-cache-dtype."""

from __future__ import annotations

from pathlib import Path

from tests.config.cli_helpers import check, check_json, invoke, write_yaml

CPU = ["--model", "tiny", "--device", "cpu"]  # tiny: 8 heads, 4 KV heads, MLP 512
ONE_GPU = ["--model", "tiny", "--device", "cuda", "--target-gpus", "1", "--target-gpu-memory", "80"]


def _fields(args: list[str]) -> list[str]:
    return [p["field"] for p in check_json(args)["problems"]]


def test_tp_flag_is_named_once_per_message() -> None:
    report = check_json([*CPU, "--tp", "3"])
    assert [p["field"] for p in report["problems"]] == ["--tp"] * 3, report["problems"]
    assert len({p["message"] for p in report["problems"]}) == 3
    output = check([*CPU, "--tp", "3"]).output
    assert "instances[" not in output.split("invalid")[0].split("error:", 1)[1]
    assert "error: --tp: TP 3 does not divide the model's 8 attention heads" in output


def test_vllm_spelling_and_role_flags_are_named() -> None:
    assert _fields([*CPU, "-tp", "3"]) == ["-tp"] * 3
    assert _fields([*CPU, "--decode-tp", "3"]) == ["--decode-tp"] * 3


def test_yaml_deployment_wide_key_is_named(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "parallel: {tp: 3}\n")
    assert _fields([str(path), *CPU]) == ["parallel.tp"] * 3
    path = write_yaml(tmp_path, "parallel: {prefill_tp: 3}\n", "p.yaml")
    assert _fields([str(path), *CPU]) == ["parallel.prefill_tp"] * 3


def test_a_group_own_tp_keeps_its_yaml_path(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "instances: [{role: prefill, tp: 3}, {role: decode}]\n")
    assert _fields([str(path), *CPU]) == ["instances[0].tp"] * 3


def test_size_problem_names_the_flag_once() -> None:
    report = check_json([*CPU, "--tp", "200000000"])
    assert [p["field"] for p in report["problems"]] == ["--tp"], report["problems"]
    assert "TP 200000000 is more than 16384 ranks" in report["problems"][0]["message"]


def test_tp_over_the_gpus_names_the_flag_once() -> None:
    report = check_json([*ONE_GPU, "--tp", "2"])
    assert [p["field"] for p in report["problems"] if "GPUs" in p["message"]] == ["--tp"], report["problems"]


def test_serve_prints_the_flag_once_per_message() -> None:
    served = invoke(["serve", *CPU, "--tp", "3"])
    assert served.exit_code == 1, served.output
    errors = [line for line in served.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3 and all(line.startswith("error: --tp: TP 3 ") for line in errors), served.output


def test_kv_cache_dtype_from_the_flag_is_named(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "instances: [{role: prefill, kv_cache_dtype: auto}, {role: decode}, "
                      "{role: decode}]\n")
    report = check_json([str(path), *CPU, "--kv-cache-dtype", "fp8"])
    assert [p["field"] for p in report["problems"]] == ["--kv-cache-dtype"], report["problems"]
    message = report["problems"][0]["message"]
    assert "instances[1]" in message and "instances[2]" in message and "instances[0].kv_cache_dtype" in message
    path = write_yaml(tmp_path, "cache: {kv_cache_dtype: fp8}\ninstances: [{role: prefill, kv_cache_dtype: auto}, "
                      "{role: decode}]\n", "file.yaml")
    assert _fields([str(path), *CPU]) == ["cache.kv_cache_dtype"]
