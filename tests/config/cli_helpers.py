"""Drive `pdlaunch` through typer's CliRunner the way a user types it, and build tiny model dirs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import Result
from typer.testing import CliRunner

from pdlaunch.cli import app

LLAMA_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "intermediate_size": 256,
    "vocab_size": 1000,
    "max_position_embeddings": 1024,
}


def invoke(args: list[str]) -> Result:
    """Run the CLI; fail the test on any exception other than the exit the command chose."""
    result = CliRunner().invoke(app, args)
    assert "Traceback" not in result.output, result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"pdlaunch {' '.join(args)} raised {result.exception!r}\n{result.output}")
    return result


def check(args: list[str]) -> Result:
    return invoke(["check-config", *args])


def check_json(args: list[str]) -> dict[str, Any]:
    """check-config --json: stdout holds exactly one JSON object."""
    result = check([*args, "--json"])
    report = json.loads(result.stdout)
    assert report["valid"] == (result.exit_code == 0)
    return report


def assert_invalid(result: Result, field: str, text: str | None = None) -> None:
    """Exit 1, and a problem line naming `field` (and containing `text`)."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith(f"error: {field}:")]
    assert lines, f"no problem for {field!r} in:\n{result.output}"
    if text is not None:
        assert any(text in line for line in lines), f"{text!r} not in {lines}"


def write_model(root: Path, name: str = "model", **changes: Any) -> Path:
    """A checkpoint directory holding only config.json (validation reads nothing else)."""
    model_dir = root / name
    model_dir.mkdir(parents=True, exist_ok=True)
    hf = {**LLAMA_CONFIG, **changes}
    (model_dir / "config.json").write_text(json.dumps({k: v for k, v in hf.items() if v is not None}))
    return model_dir


def write_yaml(root: Path, text: str, name: str = "deploy.yaml") -> Path:
    path = root / name
    path.write_text(text)
    return path
