"""The environment variables the proxy and the instances read at run time and take only some values of
(config/serving_env.py): another value silently leaves them at their default, so check-config and serve warn, naming
the variable, its value, what happens instead and the values taken. The table agrees with what the engine reads, and
README's "Environment variables" lists every PDLAUNCH_* variable the package reads or sets."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pdlaunch.config.loader import load_valid_deployment
from pdlaunch.config.serving_env import ARRIVAL_WINDOW_ENV, FALLBACK_VARIABLES, serving_env_warnings
from tests.config.cli_helpers import FREE_PORT, check

ROOT = Path(__file__).resolve().parents[2]
CPU = ["--model", "tiny", "--device", "cpu", *FREE_PORT]
BAD_WINDOWS = ["OFF", "0", "false", "no", " off", ""]
SUBPROCESS_TIMEOUT_S = 300.0  # imports torch on a loaded 2-core machine


@pytest.mark.parametrize("value", BAD_WINDOWS)
def test_check_config_warns_about_an_arrival_window_that_is_neither_on_nor_off(monkeypatch: pytest.MonkeyPatch,
                                                                                value: str) -> None:
    monkeypatch.setenv(ARRIVAL_WINDOW_ENV, value)
    result = check(CPU)
    assert result.exit_code == 0, result.output
    assert (f"warning: PDLAUNCH_ARRIVAL_WINDOW: {value!r} is not on or off (lower case), so the instances keep the "
            "arrival window on; set it to on (the default) or off, or unset it") in " ".join(result.output.split()), \
        result.output


@pytest.mark.parametrize("value", ["on", "off"])
def test_on_and_off_are_no_warning(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(ARRIVAL_WINDOW_ENV, value)
    result = check(CPU)
    assert result.exit_code == 0 and ARRIVAL_WINDOW_ENV not in result.output, result.output


def test_check_config_json_carries_the_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ARRIVAL_WINDOW_ENV, "OFF")
    result = check([*CPU, "--json"])
    assert result.exit_code == 0, result.output
    assert [w["field"] for w in json.loads(result.output)["warnings"]] == [ARRIVAL_WINDOW_ENV]


def test_serve_warns_before_it_starts(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(ARRIVAL_WINDOW_ENV, "OFF")
    caplog.set_level(logging.WARNING, logger="pdlaunch.config.loader")
    load_valid_deployment(None, {"model.path": "tiny", "device": "cpu"})
    assert any(r.getMessage().startswith("warning: PDLAUNCH_ARRIVAL_WINDOW: 'OFF' is not on or off")
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_every_variable_of_the_table_warns_once_naming_itself_and_what_to_set() -> None:
    env = {variable.name: "typo" for variable in FALLBACK_VARIABLES}
    warnings = serving_env_warnings(env)
    assert [w.field for w in warnings] == [v.name for v in FALLBACK_VARIABLES]
    for warning in warnings:
        assert warning.message.startswith("'typo' is not ") and ", so " in warning.message, warning
        assert warning.message.endswith(", or unset it"), warning
    assert serving_env_warnings({}) == []


def test_the_engine_turns_the_window_off_only_for_the_value_the_table_says() -> None:
    """engine/arrival_window.py reads the variable once, at import: each value in a fresh import, in one child
    process (the engine imports torch)."""
    values = ["on", "off", *BAD_WINDOWS]
    script = (
        "import importlib, json, os, sys\n"
        "from pdlaunch.engine import arrival_window\n"
        "seen = {}\n"
        "for value in json.loads(sys.argv[1]):\n"
        f"    os.environ[{ARRIVAL_WINDOW_ENV!r}] = value\n"
        "    seen[value] = importlib.reload(arrival_window).WINDOW_ON\n"
        "print(json.dumps(seen))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, json.dumps(values)], capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    window_on = json.loads(done.stdout.splitlines()[-1])
    assert window_on == {value: value != "off" for value in values}
    warned = {value for value in values if serving_env_warnings({ARRIVAL_WINDOW_ENV: value})}
    assert warned == set(BAD_WINDOWS)  # each warned value leaves the window on, as the warning says


def test_the_readme_lists_every_variable_the_package_names() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Environment variables"):readme.index("## Troubleshooting")]
    named = {name for path in (ROOT / "pdlaunch").rglob("*.py")
             for name in re.findall(r"PDLAUNCH_[A-Z0-9_]*[A-Z0-9]", path.read_text())}
    missing = sorted(name for name in named if f"`{name}`" not in section)
    assert not missing, f"README's Environment variables section lacks {missing}"
    for variable in FALLBACK_VARIABLES:
        row = next(line for line in section.splitlines() if line.startswith(f"| `{variable.name}` |"))
        assert "| warned;" in row, row
