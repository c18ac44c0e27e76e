"""The README's configuration reference names every config key, and its two set-up commands are what CI runs."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.topology_config import InstanceGroupConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += _keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def test_every_config_key_is_in_the_reference() -> None:
    missing = [k for k in _keys(DeploymentConfig) if f"| `{k}` |" not in README]
    missing += [k for k in InstanceGroupConfig.model_fields if f"| `{k}` |" not in README]
    assert not missing, f"README's configuration reference lacks {missing}"


def test_the_first_screen_gives_the_two_setup_commands_ci_uses() -> None:
    first_screen = README[:README.index("## Commands")]
    assert "make serve" in first_screen and "make test" in first_screen
    assert "make test\n" in (ROOT / ".ci" / "run").read_text()
