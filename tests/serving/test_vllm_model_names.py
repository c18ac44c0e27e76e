"""Served model names as vLLM has them: --served-model-name (one or several), else --model as typed."""

from __future__ import annotations

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.server.instance import accepted_model_names, served_model_names


def _cfg(model: dict) -> DeploymentConfig:
    return DeploymentConfig.model_validate({"model": model})


def test_default_is_the_model_value_and_the_basename_is_accepted() -> None:
    cfg = _cfg({"path": "/data/models/llama3-8b/"})
    assert served_model_names(cfg) == ["/data/models/llama3-8b/"]
    assert accepted_model_names(cfg) == {"/data/models/llama3-8b/", "llama3-8b"}
    assert served_model_names(_cfg({"path": "demo"})) == ["demo"]
    assert accepted_model_names(_cfg({"path": "tiny"})) == {"tiny"}


def test_served_model_names_replace_the_path() -> None:
    one = _cfg({"path": "/data/llama3-8b", "served_model_name": "llama"})
    assert served_model_names(one) == ["llama"] and accepted_model_names(one) == {"llama"}
    many = _cfg({"path": "tiny", "served_model_name": ["a", "b"]})
    assert served_model_names(many) == ["a", "b"] and accepted_model_names(many) == {"a", "b"}
