"""parallel.rendezvous_timeout_seconds: how long the ranks of a TP group wait for one another to start and join.
It was a constant (120 s), too short for a worker pod still pulling its image; the config field is checked like
every other wait (positive, at most a week) and a bad value names the field. A value the launcher's readiness
deadline would cut short (it stops an instance not ready 900 s after its start) is a warning
(config/rules/rendezvous.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.loader import load_deployment, load_valid_deployment
from pdlaunch.config.rules.rendezvous import LAUNCHER_READY_S
from pdlaunch.config.strict_model import MAX_SECONDS
from pdlaunch.errors import ConfigError
from pdlaunch.launcher.readiness import READY_TIMEOUT_S
from tests.config.cli_helpers import FREE_PORT, assert_invalid, check, write_yaml

CPU = ["--model", "tiny", "--device", "cpu", *FREE_PORT]
FIELD = "parallel.rendezvous_timeout_seconds"


@pytest.mark.parametrize(("value", "says"), [
    ("0", "must be > 0.0, got 0"), ("-5", "must be > 0.0, got -5"), (str(MAX_SECONDS + 1), "must be <= 604800"),
    ("soon", "number"), ("null", "number")], ids=["zero", "negative", "past-a-week", "text", "null"])
def test_a_bad_value_is_refused_naming_the_field(tmp_path: Path, value: str, says: str) -> None:
    path = write_yaml(tmp_path, f"parallel: {{rendezvous_timeout_seconds: {value}}}\n")
    assert_invalid(check([str(path), *CPU]), FIELD, says)
    with pytest.raises(ConfigError) as caught:
        load_deployment(path, {"model.path": "tiny", "device": "cpu"})
    assert any(field == FIELD for field, _ in caught.value.problems), caught.value.problems


def test_the_default_and_a_value_given(tmp_path: Path) -> None:
    assert DeploymentConfig().parallel.rendezvous_timeout_seconds == 120.0
    path = write_yaml(tmp_path, "parallel: {rendezvous_timeout_seconds: 1800}\n")
    assert check([str(path), *CPU]).exit_code == 0
    config = load_deployment(path, {"model.path": "tiny", "device": "cpu"})
    assert config.parallel.rendezvous_timeout_seconds == 1800.0
    # every rank reads it from the deployment JSON it is handed (remote_rank --deployment, a Ray actor's copy)
    again = DeploymentConfig.model_validate_json(config.model_dump_json())
    assert again.parallel.rendezvous_timeout_seconds == 1800.0


def warnings_of(path: Path) -> list[str]:
    result = check([str(path), *CPU])
    assert result.exit_code == 0, result.output
    return [" ".join(line.split()) for line in result.output.splitlines() if line.startswith("warning:")]


def test_a_setting_the_launchers_readiness_deadline_cuts_short_is_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Each node's launcher gives an instance 900 s from its start to be ready and then stops the start: a TP group
    allowed a longer rendezvous (a node expected to start 20 minutes late) fails as `not ready after 900s`, which
    names neither the late rank nor the setting. check-config and serve say so before anything starts."""
    path = write_yaml(tmp_path, "parallel: {rendezvous_timeout_seconds: 1800, tp: 2}\n")
    said = warnings_of(path)
    assert len(said) == 1 and said[0].startswith(
        f"warning: {FIELD}: 1800s is not below the 900s the launcher gives an instance to be ready"), said
    assert "`not ready after 900s`" in said[0] and "render kubernetes" in said[0], said
    with caplog.at_level(logging.WARNING, logger="pdlaunch"):
        load_valid_deployment(path, {"model.path": "tiny", "device": "cpu"})
    assert f"warning: {FIELD}: 1800s is not below the 900s" in caplog.text


@pytest.mark.parametrize("yaml_text", ["parallel: {rendezvous_timeout_seconds: 899, tp: 2}\n",
                                       "parallel: {rendezvous_timeout_seconds: 1800}\n"],
                         ids=["below-the-deadline", "no-tp-group"])
def test_a_setting_the_deadline_leaves_room_for_or_no_tp_group_is_no_warning(tmp_path: Path, yaml_text: str) -> None:
    assert not any(FIELD in line for line in warnings_of(write_yaml(tmp_path, yaml_text)))


def test_the_deadline_checked_is_the_launchers() -> None:
    assert LAUNCHER_READY_S == READY_TIMEOUT_S
