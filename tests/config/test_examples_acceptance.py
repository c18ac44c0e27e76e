"""Every file in examples/ validates (with the target flags its `# check:` line gives); acceptance commands."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from pdlaunch.config.security_rules import SECRET_ENV
from tests.config.cli_helpers import check, check_json, invoke

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def _check_args(example: Path) -> list[str]:
    line = next(x for x in example.read_text().splitlines() if x.startswith("# check: pdlaunch check-config "))
    args = shlex.split(line.removeprefix("# check: pdlaunch check-config "))
    return [str(example) if a == f"examples/{example.name}" else a for a in args]


def test_the_five_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"cpu-1p1d-demo.yaml", "gpu-1p1d-single.yaml", "gpu-2p1d-tp2-decode.yaml", "two-nodes.yaml",
            "sleep-mode.yaml"} <= names


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_validates(example: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A multi-node example takes its shared secret from the environment, as on real nodes.
    monkeypatch.setenv(SECRET_ENV, "example-secret-0123456789abcdef")
    args = _check_args(example)
    assert str(example) in args
    result = check(args)
    assert result.exit_code == 0, result.output
    assert "valid" in result.output


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
