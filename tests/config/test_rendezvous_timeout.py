"""parallel.rendezvous_timeout_seconds: how long the ranks of a TP group wait for one another to start and join.
It was a constant (120 s), too short for a worker pod still pulling its image; the config field is checked like
every other wait (positive, at most a week) and a bad value names the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.loader import load_deployment
from pdlaunch.config.strict_model import MAX_SECONDS
from pdlaunch.errors import ConfigError
from tests.config.cli_helpers import assert_invalid, check, write_yaml

CPU = ["--model", "tiny", "--device", "cpu"]
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
