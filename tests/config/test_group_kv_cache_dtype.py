"""Per-group `kv_cache_dtype`: colocated groups may differ; prefill and decode groups must agree, and
check-config (and `render kubernetes`) refuse a deployment whose prefill and decode would not; what each
instance is told (launcher plan, Kubernetes pod spec) carries its group's dtype and expert-parallel mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from typer.testing import CliRunner

from pdlaunch.cli import app
from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec, instance_cache
from pdlaunch.config.loader import load_valid_deployment
from pdlaunch.launcher.plan import plan_deployment
from tests.config.cli_helpers import assert_invalid, check, check_json
from tests.helpers.ports import free_port


def _write(tmp_path: Path, body: dict[str, Any]) -> Path:
    path = tmp_path / "deployment.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": "tiny"}, "device": "cpu", **body}))
    return path


def test_check_config_refuses_prefill_and_decode_of_different_kv_dtypes(tmp_path: Path) -> None:
    config = _write(tmp_path, {"cache": {"kv_cache_dtype": "fp8"},
                               "instances": [{"role": "prefill"}, {"role": "decode", "kv_cache_dtype": "auto"}]})
    result = check([str(config)])
    assert_invalid(result, "instances[1].kv_cache_dtype",
                   "this decode group's KV cache is auto but the prefill group instances[0]'s is fp8 "
                   "(cache.kv_cache_dtype)")
    assert "set one kv_cache_dtype for every prefill and decode group" in result.output
    assert [p["field"] for p in check_json([str(config)])["problems"]] == ["instances[1].kv_cache_dtype"]


def test_a_per_group_setting_equal_to_the_others_is_accepted(tmp_path: Path) -> None:
    config = _write(tmp_path, {"proxy": {"port": free_port()},
                               "instances": [{"role": "prefill", "kv_cache_dtype": "fp8"},
                                             {"role": "decode", "kv_cache_dtype": "fp8", "count": 2}]})
    assert check([str(config)]).exit_code == 0
    cfg = load_valid_deployment(config, {})
    assert [i.spec.kv_cache_dtype for i in plan_deployment(cfg).instances] == ["fp8"] * 3


def test_colocated_groups_may_differ_and_each_instance_runs_its_own(tmp_path: Path) -> None:
    config = _write(tmp_path, {"colocated": True, "proxy": {"port": free_port()},
                               "instances": [{"role": "colocated", "kv_cache_dtype": "fp8"}, {"role": "colocated"}]})
    assert check([str(config)]).exit_code == 0
    cfg = load_valid_deployment(config, {})
    specs = [i.spec for i in plan_deployment(cfg).instances]
    assert [s.kv_cache_dtype for s in specs] == ["fp8", "auto"]
    assert [instance_cache(cfg, s).kv_cache_dtype for s in specs] == ["fp8", "auto"]
    assert instance_cache(cfg, None) is cfg.cache


def test_kubernetes_pods_carry_the_group_kv_dtype_and_expert_parallel(tmp_path: Path) -> None:
    config = _write(tmp_path, {"cache": {"kv_cache_dtype": "fp8"}, "instances": [
        {"role": "prefill", "enable_expert_parallel": True}, {"role": "decode"}]})
    out = tmp_path / "manifests"
    result = CliRunner().invoke(app, ["render", "kubernetes", str(config), "--out", str(out), "--image", "x"])
    assert result.exit_code == 0, result.output
    specs = {}
    for path in sorted(out.glob("*.yaml")):
        manifest = yaml.safe_load(path.read_text())
        if manifest["kind"] != "LeaderWorkerSet":
            continue
        (engine,) = manifest["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"]
        arg = engine["args"][engine["args"].index("--instance") + 1]  # as the kubelet expands it in the pod
        spec = InstanceSpec.model_validate_json(arg.replace("$(POD_NAME)", f"{manifest['metadata']['name']}-0"))
        specs[spec.role] = spec
    assert (specs["prefill"].expert_parallel, specs["decode"].expert_parallel) == (True, False)
    assert specs["prefill"].kv_cache_dtype == specs["decode"].kv_cache_dtype == "fp8"

    bad = _write(tmp_path, {"instances": [{"role": "prefill"}, {"role": "decode", "kv_cache_dtype": "fp8"}]})
    result = CliRunner().invoke(app, ["render", "kubernetes", str(bad), "--out", str(tmp_path / "x"), "--image", "x"])
    assert result.exit_code == 1 and "instances[1].kv_cache_dtype" in result.output, result.output
    assert "Traceback" not in result.output


def test_the_deployment_json_an_instance_reads_keeps_the_group_field() -> None:
    cfg = DeploymentConfig.model_validate({"instances": [{"role": "prefill", "kv_cache_dtype": "fp8"},
                                                         {"role": "decode", "kv_cache_dtype": "fp8"}]})
    again = DeploymentConfig.model_validate_json(cfg.model_dump_json())
    assert [g.kv_cache_dtype for g in again.instances] == ["fp8", "fp8"]
