"""supervision.drain_timeout_seconds (flag --drain-timeout-seconds): validated and named where wrong, and passed
to whatever drains: the local proxy's argv and the launcher's wait for it, the Kubernetes proxy pod (and its
termination grace, so the kubelet does not cut the drain), the Slurm launcher's wait for its nodes. The drain
itself through `pdlaunch serve`: tests/serving/test_drain_timeout_e2e.py."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.launcher.backends.slurm import STEP_STOP_TIMEOUT_S, step_stop_timeout_s
from pdlaunch.launcher.deployment import Deployment
from pdlaunch.proxy.__main__ import parse_args
from tests.config.cli_helpers import check
from tests.render.test_kubernetes import by_kind, check_schemas, container, render


def _cfg(**supervision: Any) -> DeploymentConfig:
    return DeploymentConfig.model_validate({"model": {"path": "tiny"}, "device": "cpu", "supervision": supervision})


def test_the_default_stays_5_seconds_and_bad_values_are_refused_naming_the_flag() -> None:
    assert _cfg().supervision.drain_timeout_seconds == 5.0
    assert check(["--model", "tiny", "--drain-timeout-seconds", "30"]).exit_code == 0
    for bad, says in (("0", "must be > 0.0, got 0.0"), ("-1", "must be > 0.0"), ("3601", "must be <= 3600.0"),
                      ("soon", "valid number")):
        result = check(["--model", "tiny", "--drain-timeout-seconds", bad])
        assert result.exit_code == 1 and "--drain-timeout-seconds" in result.output and says in result.output, \
            result.output


def test_the_local_proxy_gets_the_drain_and_the_launcher_waits_for_it(tmp_path: Path) -> None:
    deployment = Deployment(_cfg(drain_timeout_seconds=12.5), Console(file=io.StringIO()), log_dir=tmp_path)
    try:
        assert deployment.drain_timeout_s == 12.5
        assert parse_args(deployment._proxy_argv()[3:]).drain_timeout == 12.5  # noqa: SLF001
    finally:
        deployment.reservations.release()


def test_the_kubernetes_proxy_gets_the_drain_and_a_grace_period_that_fits_it(tmp_path: Path) -> None:
    def proxy_pod(drain: float | None, out: Path) -> dict[str, Any]:
        raw: dict[str, Any] = {"model": {"path": "/models/m"}, "device": "cuda"}
        if drain is not None:
            raw["supervision"] = {"drain_timeout_seconds": drain}
        out.mkdir()
        (out / "d.yaml").write_text(yaml.safe_dump(raw))
        deployment = by_kind(render(out, str(out / "d.yaml")), "Deployment")[0]
        check_schemas(deployment)
        return deployment["spec"]["template"]["spec"]  # type: ignore[no-any-return]

    default = proxy_pod(None, tmp_path / "default")
    assert "terminationGracePeriodSeconds" not in default and "--drain-timeout" not in container(
        {"spec": default})["args"]
    long = proxy_pod(120, tmp_path / "long")
    assert long["terminationGracePeriodSeconds"] == 135
    assert parse_args(container({"spec": long})["args"]).drain_timeout == 120.0


def test_slurm_waits_for_the_nodes_as_much_longer_as_the_drain_is() -> None:
    assert step_stop_timeout_s(_cfg()) == STEP_STOP_TIMEOUT_S
    assert step_stop_timeout_s(_cfg(drain_timeout_seconds=65)) == STEP_STOP_TIMEOUT_S + 60


@pytest.mark.parametrize("value", [0, 3601])
def test_the_yaml_field_is_bounded(value: float) -> None:
    with pytest.raises(ValueError, match="drain_timeout_seconds"):
        _cfg(drain_timeout_seconds=value)
