"""`pdlaunch bench` flags a black-box audit found misnamed or unchecked, driven as a user types them.

- `--burstiness nan` / `--request-rate nan` (and the other float flags) said "Input should be greater than 0" of NaN,
  and `--burstiness inf`, an infinite SLO or `bench serve --request-timeout inf` passed. Now NaN and infinity are
  named for what they are, with what the flag takes; `--request-rate inf` stays valid (all at once, as documented).
- `bench serve --result-filename ../../x` wrote outside `--result-dir`. A relative name now stays under it; an
  absolute path (vLLM's bench joins them, so it replaces the folder) and a sub-folder are still taken.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from pdlaunch.bench.cli import bench_app
from tests.bench.fake_openai import fake_server

SMALL = ["--num-prompts", "2", "--random-input-len", "4", "--random-output-len", "2"]
TINY_COMPARE = ["--model", "tiny", "--device", "cpu", "--input-len", "12", "--output-len", "4", "--max-model-len", "64",
                "--rates", "2"]
SECONDS = "give a positive number of seconds, e.g. 600"


def _refused(result: Result, line: str) -> None:
    text = " ".join(result.output.split())
    assert result.exit_code == 1, text
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in text, text
    assert f"error: {line}" in text, text


@pytest.mark.parametrize(("args", "line"), [
    (["--burstiness", "nan"], "--burstiness: nan is not a number (NaN); give a positive gamma shape"),
    (["--burstiness", "inf"], "--burstiness: inf is infinite; give a positive gamma shape"),
    (["--request-rate", "nan"], "--request-rate: nan is not a number (NaN); give a positive number of requests/s, "
                                "or inf to send all at once"),
    (["--request-rate", "-inf"], "--request-rate: -inf must be greater than 0; give a positive number of "
                                 "requests/s, or inf to send all at once"),
    (["--request-timeout", "nan"], f"--request-timeout: nan is not a number (NaN); {SECONDS}"),
    (["--request-timeout", "inf"], f"--request-timeout: inf is infinite; {SECONDS}"),
    (["--random-range-ratio", "nan"], "--random-range-ratio: nan is not a number (NaN); give a ratio from 0"),
    (["--goodput", "ttft:nan"], "--goodput: SLO 'ttft:nan': nan is not a number (NaN): give a positive number of "
                                "milliseconds"),
    (["--goodput", "e2el:inf"], "--goodput: SLO 'e2el:inf': inf is infinite"),
])
def test_serve_names_nan_and_infinity(args: list[str], line: str) -> None:
    with fake_server() as (url, seen):
        result = CliRunner().invoke(bench_app, ["serve", "--base-url", url, *SMALL, *args])
    _refused(result, line)
    assert seen == []  # refused before any request


def test_serve_still_takes_an_infinite_request_rate(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    with fake_server() as (url, seen):
        result = CliRunner().invoke(bench_app, ["serve", "--base-url", url, *SMALL, "--request-rate", "inf",
                                                "--result-filename", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["completed"] == 2 and len(seen) >= 2


@pytest.mark.parametrize(("args", "line"), [
    (["--burstiness", "nan"], "--burstiness: nan is not a number (NaN); give a positive gamma shape"),
    (["--burstiness", "inf"], "--burstiness: inf is infinite"),
    (["--ttft-slo-ms", "nan"], "--ttft-slo-ms: nan is not a number (NaN); give a positive number of milliseconds"),
    (["--tight-tpot-slo-ms", "inf"], "--tight-tpot-slo-ms: inf is infinite; give a positive number of milliseconds"),
    (["--duration", "nan"], "--duration: nan is not a number (NaN); give a positive number of seconds"),
    (["--request-timeout", "inf"], f"--request-timeout: inf is infinite; {SECONDS}"),
    (["--ready-timeout", "nan"], f"--ready-timeout: nan is not a number (NaN); {SECONDS}"),
    (["--disaggregate-min-tokens", "4", "--disaggregate-max-itl-ms", "nan"],
     "--disaggregate-max-itl-ms: nan is not a number (NaN)"),
])
def test_compare_names_nan_and_infinity(tmp_path: Path, args: list[str], line: str) -> None:
    result = CliRunner().invoke(bench_app, ["compare", *TINY_COMPARE, *args, "--out", str(tmp_path / "out")])
    _refused(result, line)
    assert not (tmp_path / "out" / "colocated.json").exists()


@pytest.mark.parametrize("name", ["../escaped.json", "sub/../../escaped.json", "../../etc/x"])
def test_a_result_filename_that_climbs_out_of_result_dir_is_refused(tmp_path: Path, name: str) -> None:
    results = tmp_path / "a" / "results"
    with fake_server() as (url, seen):
        result = CliRunner().invoke(bench_app, ["serve", "--base-url", url, *SMALL, "--result-dir", str(results),
                                                "--result-filename", name])
    _refused(result, f"--result-filename: {name!r} climbs out of --result-dir with '..'")
    assert "--result-dir" in result.output and seen == []
    assert not (tmp_path / "a" / "escaped.json").exists() and not (tmp_path / "escaped.json").exists()


def test_multi_turn_refuses_it_too(tmp_path: Path) -> None:
    with fake_server() as (url, seen):
        result = CliRunner().invoke(bench_app, ["serve", "--base-url", url, "--multi-turn", "--endpoint",
                                                "/v1/chat/completions", "--result-dir", str(tmp_path),
                                                "--result-filename", "../x.json"])
    _refused(result, "--result-filename: '../x.json' climbs out of --result-dir")
    assert seen == []


def test_a_result_filename_in_a_sub_folder_of_result_dir_is_written_there(tmp_path: Path) -> None:
    with fake_server() as (url, _):
        result = CliRunner().invoke(bench_app, ["serve", "--base-url", url, *SMALL, "--result-dir", str(tmp_path),
                                                "--result-filename", "sub/r.json"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "sub" / "r.json").read_text())["completed"] == 2
