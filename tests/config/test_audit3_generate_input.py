"""`pdlaunch generate` input a user gets wrong: an empty model name (`generate "$MODEL"` with MODEL unset) is
refused naming the argument, not quietly served by the demo model; `--version` into a stdout that cannot take
it is one error line, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.config.cli_helpers import assert_invalid, invoke

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("args", "field"), [([""], "MODEL"), (["  "], "MODEL"), (["--model", ""], "--model")])
def test_an_empty_model_is_refused_not_the_demo(args: list[str], field: str) -> None:
    result = invoke(["generate", *args, "--max-tokens", "1", "--device", "cpu"])
    assert_invalid(result, field, "names no model")
    assert "pdlaunch generate (demo)" not in result.output


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this system")
@pytest.mark.parametrize("args", [["--version"], ["config", "schema"], ["config", "example"],
                                  ["generate", "tiny", "--device", "cpu", "--max-tokens", "2", "--json"],
                                  ["generate", "tiny", "--device", "cpu", "--max-tokens", "2"]])
def test_output_into_a_full_stdout_is_one_error_line(args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CI": "true"}
    with open(os.devnull, "rb") as stdin, open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-c", "from pdlaunch.cli import main; main()", *args], stdin=stdin,
                              stdout=full, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("error: stdout: cannot write the ") and "No space left on device" in done.stderr


@pytest.mark.parametrize("positional", [True, False])
def test_a_model_that_is_not_there_is_named_as_the_user_gave_it(tmp_path: Path, positional: bool) -> None:
    for model, text in ((str(tmp_path / "missing"), "does not exist"), (str(tmp_path), "has no config.json")):
        args = [model] if positional else ["--model", model]
        result = invoke(["generate", *args, "--max-tokens", "1", "--device", "cpu"])
        assert_invalid(result, "MODEL" if positional else "--model", text)
