"""Settings that do nothing with this model or layout are warnings naming what the user set
(config/rules/no_effect.py): check-config prints them (and --json lists them), serve logs them; the deployment
stays valid. Values left at their defaults are not named."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from pdlaunch.config.loader import load_valid_deployment
from tests.config.cli_helpers import FREE_PORT, check

CPU = ["--model", "demo", "--device", "cpu", *FREE_PORT]
COLOCATED = "has no effect: every instance is colocated"


def warnings_of(args: list[str]) -> list[str]:
    result = check(args)
    assert result.exit_code == 0, result.output
    return [" ".join(line.split()) for line in result.output.splitlines() if line.startswith("warning:")]


def test_expert_parallel_on_a_dense_model_is_a_warning_naming_what_the_user_set(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """vLLM takes --enable-expert-parallel with a dense model and says nothing; it placed nothing here either,
    silently. check-config and serve now say so (a warning: the deployment is still valid)."""
    result = check([*CPU, "--enable-expert-parallel"])
    assert result.exit_code == 0, result.output
    assert ("warning: --enable-expert-parallel: has no effect: 'demo' (LlamaForCausalLM) is a dense model, with no "
            "experts to place; drop it, or serve a Mixture-of-Experts checkpoint") in " ".join(result.output.split())
    path = tmp_path / "ep.yaml"
    path.write_text("instances:\n  - {role: prefill, enable_expert_parallel: true}\n  - {role: decode}\n")
    report = json.loads(check([str(path), *CPU, "--json"]).output)
    assert report["valid"] and [w["field"] for w in report["warnings"]] == ["instances[0].enable_expert_parallel"]
    with caplog.at_level(logging.WARNING, logger="pdlaunch"):
        load_valid_deployment(path, {"model.path": "demo", "device": "cpu"})
    assert "warning: instances[0].enable_expert_parallel: has no effect" in caplog.text


def test_expert_parallel_on_a_moe_model_is_no_warning(moe_ckpt: Callable[[str], Path]) -> None:
    result = check(["--model", str(moe_ckpt("qwen3_moe")), "--device", "cpu", *FREE_PORT, "--enable-expert-parallel"])
    # Only the port check may warn (another test's process can hold the free port picked): nothing else
    warnings = [line for line in result.output.splitlines() if "warning" in line and "in use now" not in line]
    assert result.exit_code == 0 and not warnings, result.output



@pytest.mark.parametrize(("flags", "field"), [(["--transfer-mode", "push"], "--transfer-mode"),
                                              (["--kv-connector", "mooncake"], "--kv-connector"),
                                              (["--prefill-tp", "3"], "--prefill-tp"),
                                              (["--decode-tp", "3"], "--decode-tp"),
                                              (["--kv-load-failure-policy", "fail"], "--kv-load-failure-policy")])
def test_kv_transfer_and_role_tp_in_a_colocated_deployment_are_named(flags: list[str], field: str) -> None:
    said = warnings_of([*CPU, "--colocated", *flags])
    assert len(said) == 1 and said[0].startswith(f"warning: {field}: {COLOCATED}"), said


def test_the_same_settings_with_prefill_and_decode_are_no_warning(tmp_path: Path) -> None:
    assert warnings_of([*CPU, "--transfer-mode", "pull", "--kv-connector", "nixl", "--prefill-tp", "3"]) == []
    assert warnings_of([*CPU, "--colocated"]) == []  # defaults are not named
    path = tmp_path / "colocated.yaml"
    path.write_text("colocated: true\nkv_transfer: {transfer_mode: pull}\n")
    said = warnings_of([str(path), *CPU])
    assert len(said) == 1 and said[0].startswith(f"warning: kv_transfer.transfer_mode: {COLOCATED}"), said


TARGET = ["--model", "demo", "--device", "cuda", "--target-gpus", "1", "--target-gpu-memory", "80"]


@pytest.mark.parametrize(("args", "said"), [
    ([*CPU, "--gpu-memory-utilization", "0.5"],
     "warning: --gpu-memory-utilization: has no effect on the CPU: cache.cpu_kv_cache_gb sizes the KV cache there"),
    ([*TARGET, "--num-gpu-blocks", "600", "--gpu-memory-utilization", "0.3"],
     "warning: --gpu-memory-utilization: has no effect: --num-gpu-blocks fixes the KV cache's size")])
def test_a_kv_budget_setting_another_one_overrides_is_named(args: list[str], said: str) -> None:
    warned = warnings_of(args)
    assert len(warned) == 1 and warned[0].startswith(said), warned


def test_the_one_gpu_split_of_gpu_memory_utilization_is_not_the_users_setting() -> None:
    """P and D on one GPU get gpu_memory_utilization 0.45 each from check-config itself: with num_gpu_blocks set,
    that split is no setting of the user's to warn about."""
    assert warnings_of([*TARGET, "--num-gpu-blocks", "600"]) == []
    assert warnings_of([*TARGET]) == []


def test_prefix_routing_with_prefix_caching_off_is_a_warning() -> None:
    """No instance caches a prefix, so the proxy's scores all tie and it routes as least_loaded."""
    said = warnings_of([*CPU, "--routing-policy", "prefix", "--no-enable-prefix-caching"])
    assert said == ["warning: --routing-policy: prefix has no effect: prefix caching is off, so no instance caches a "
                    "prefix to route by and every prompt goes to the least loaded instance; drop "
                    "--no-enable-prefix-caching, or use --routing-policy least_loaded"], said
    assert warnings_of([*CPU, "--routing-policy", "prefix"]) == []
    assert warnings_of([*CPU, "--routing-policy", "least_loaded", "--no-enable-prefix-caching"]) == []


TINY = ["--model", "tiny", "--device", "cpu", *FREE_PORT]
SHADOWED = "has no effect: every instance takes its"


@pytest.mark.parametrize(("yaml", "flags", "said"), [
    ("", ["--tp", "2", "--prefill-tp", "1", "--decode-tp", "1"],
     "warning: --tp: has no effect: every instance takes its TP size from --prefill-tp, --decode-tp instead"),
    ("instances: [{role: prefill, tp: 1}, {role: decode, tp: 1}]\n", ["--tp", "2"],
     "warning: --tp: has no effect: every instance takes its TP size from instances[0].tp, instances[1].tp instead"),
    ("instances: [{role: prefill, tp: 1}, {role: decode, tp: 1}]\n", ["-tp", "2"],
     "warning: -tp: has no effect: every instance takes its TP size from instances[0].tp, instances[1].tp instead"),
    ("instances: [{role: prefill, tp: 1}, {role: prefill, tp: 2, count: 0}, {role: decode}]\n",
     ["--prefill-tp", "2"],
     "warning: --prefill-tp: has no effect: every prefill instance takes its TP size from instances[0].tp instead"),
    ("cache: {kv_cache_dtype: fp8}\ninstances: [{role: prefill, kv_cache_dtype: auto}, "
     "{role: decode, kv_cache_dtype: auto}]\n", [],
     "warning: cache.kv_cache_dtype: has no effect: every instance takes its KV cache dtype from "
     "instances[0].kv_cache_dtype, instances[1].kv_cache_dtype instead"),
])
def test_a_setting_every_instance_group_overrides_is_named(tmp_path: Path, yaml: str, flags: list[str],
                                                           said: str) -> None:
    """`--tp 2` beside groups (or roles) that each set their own TP ran every instance at TP 1 without a word."""
    path = tmp_path / "groups.yaml"
    path.write_text(yaml)
    warned = warnings_of([str(path), *TINY, *flags])
    assert len(warned) == 1 and warned[0].startswith(said), warned


@pytest.mark.parametrize(("yaml", "flags"), [
    ("", ["--tp", "2", "--prefill-tp", "1"]),  # decode instances take --tp
    ("instances: [{role: prefill, tp: 1}, {role: decode}]\n", ["--tp", "2"]),
    ("instances: [{role: prefill, tp: 1}, {role: prefill}, {role: decode}]\n", ["--prefill-tp", "2"]),
    ("instances: [{role: prefill, kv_cache_dtype: auto}, {role: decode}]\ncache: {kv_cache_dtype: auto}\n", []),
    ("instances: [{role: prefill, tp: 1}, {role: decode, tp: 1}]\n", []),  # nothing deployment-wide given
])
def test_a_setting_some_instance_takes_is_no_warning(tmp_path: Path, yaml: str, flags: list[str]) -> None:
    path = tmp_path / "groups.yaml"
    path.write_text(yaml)
    assert warnings_of([str(path), *TINY, *flags]) == []


def test_expert_parallel_every_group_overrides_is_named(moe_ckpt: Callable[[str], Path]) -> None:
    moe = ["--model", str(moe_ckpt("qwen3_moe")), "--device", "cpu", *FREE_PORT]
    warned = warnings_of([*moe, "--enable-expert-parallel", "--no-prefill-expert-parallel",
                          "--no-decode-expert-parallel"])
    assert len(warned) == 1 and warned[0].startswith(
        "warning: --enable-expert-parallel: has no effect: every instance takes its expert parallelism from "
        "--no-prefill-expert-parallel, --no-decode-expert-parallel instead"), warned
    assert warnings_of([*moe, "--enable-expert-parallel", "--no-decode-expert-parallel"]) == []


@pytest.mark.parametrize(("flags", "yaml", "said"), [
    (["--kv-connector", "storage", "--transfer-mode", "push"], "",
     "warning: --transfer-mode: has no effect with the storage connector"),
    ([], "kv_transfer: {storage_path: /tmp/kv}\n", "warning: kv_transfer.storage_path: has no effect with the nixl "
     "connector"),
    ([], "kv_transfer: {mooncake_protocol: tcp}\n", "warning: kv_transfer.mooncake_protocol: has no effect with the "
     "nixl connector"),
    (["--kv-connector", "storage"], "kv_transfer: {mooncake_metadata_server: 'http://m:8080'}\n",
     "warning: kv_transfer.mooncake_metadata_server: has no effect with the storage connector"),
    (["--kv-connector", "storage"], "kv_transfer: {side_channel_host: 0.0.0.0}\n",
     "warning: kv_transfer.side_channel_host: has no effect with the storage connector: only nixl and mooncake "
     "read it"),
])
def test_a_kv_transfer_setting_the_chosen_connector_does_not_read_is_named(tmp_path: Path, flags: list[str],
                                                                          yaml: str, said: str) -> None:
    path = tmp_path / "kv.yaml"
    path.write_text(yaml)
    warned = warnings_of([str(path), *TINY, *flags])
    assert len(warned) == 1 and warned[0].startswith(said), warned


def test_a_connector_setting_in_a_colocated_deployment_is_named_once(tmp_path: Path) -> None:
    path = tmp_path / "colocated.yaml"
    path.write_text("colocated: true\nkv_transfer: {storage_path: /tmp/kv, mooncake_protocol: tcp}\n")
    warned = warnings_of([str(path), *TINY])
    assert [w.split(";")[0] for w in warned] == [f"warning: kv_transfer.{name}: {COLOCATED}, so no KV moves between "
                                                 "instances" for name in ("storage_path", "mooncake_protocol")], warned
