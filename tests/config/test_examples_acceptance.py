"""Every file in examples/ validates: its `# check:` line runs as written (environment assignments, then the
pdlaunch command, from the repository root); acceptance commands."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pdlaunch.config.rules.security import SECRET_ENV
from tests.config.cli_helpers import check, check_json, invoke

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CHECK = "# check: "
_ASSIGNMENT = re.compile(r"[A-Z_][A-Z0-9_]*=")


def _check_line(example: Path) -> tuple[dict[str, str], list[str]]:
    """(environment it sets, pdlaunch arguments) of the example's `# check:` line: `NAME=value ... pdlaunch ARGS`."""
    line = next((x for x in example.read_text().splitlines() if x.startswith(CHECK)), None)
    assert line is not None, f"{example.name} has no `{CHECK}...` line"
    words = shlex.split(line.removeprefix(CHECK))
    env = {}
    while words and _ASSIGNMENT.match(words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    assert words[:1] == ["pdlaunch"], f"{example.name}: the check line runs {words[:1]}, not pdlaunch"
    return env, words[1:]


def _check_args(example: Path) -> list[str]:
    args = _check_line(example)[1]
    assert args[0] == "check-config", args
    return [str(example) if a == f"examples/{example.name}" else a for a in args[1:]]


def test_the_five_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"cpu-1p1d-demo.yaml", "gpu-1p1d-single.yaml", "gpu-2p1d-tp2-decode.yaml", "two-nodes.yaml",
            "sleep-mode.yaml"} <= names


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_check_line_passes_as_written(example: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what the line sets: no deployment secret from this machine's environment."""
    env, args = _check_line(example)
    assert f"examples/{example.name}" in args
    monkeypatch.delenv(SECRET_ENV, raising=False)
    monkeypatch.chdir(ROOT)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = invoke(args)
    assert result.exit_code == 0, result.output
    assert "valid" in result.output and "invalid" not in result.output


def test_sleep_mode_example_resolves_cumem_on() -> None:
    example = next(p for p in EXAMPLES if p.name == "sleep-mode.yaml")
    assert check_json(_check_args(example))["config"]["model"]["enable_cumem_allocator"] is True


def test_acceptance_demo_on_cpu_is_valid() -> None:
    assert check(["--model", "demo", "--device", "cpu"]).exit_code == 0


def test_acceptance_cumem_on_cpu_fails_with_the_message() -> None:
    result = check(["--model", "demo", "--device", "cpu", "--enable-cumem-allocator"])
    assert result.exit_code == 1
    assert "cumem allocator is not supported on current platform" in result.output


def test_acceptance_sleep_mode_on_target_reports_cumem_on() -> None:
    result = invoke(["check-config", "--model", "demo", "--device", "cuda", "--target-gpus", "2",
                     "--target-gpu-memory", "80", "--enable-sleep-mode", "--json"])
    import json

    report = json.loads(result.stdout)
    assert result.exit_code == 0 and report["valid"] is True
    assert report["config"]["model"]["enable_cumem_allocator"] is True
