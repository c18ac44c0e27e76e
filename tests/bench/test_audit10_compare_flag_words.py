"""`pdlaunch bench compare`'s flag errors in pdlaunch's words, driven as a user types them.

An audit found them in pydantic's: `--num-prompts 0` said `--num-prompts: Input should be greater than or equal to
1`, `--advise-for x` `Input should be 'relaxed' or 'tight'`, `--input-lens 0,4` `--input-lens.0: ...`: the flag,
but neither the value typed nor what to give. Each now says the flag, the value, what is wrong and what to give.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from pdlaunch.bench.cli import bench_app

TINY_COMPARE = ["--model", "tiny", "--device", "cpu", "--input-len", "12", "--output-len", "4", "--max-model-len", "64"]
MS = "give a positive number of milliseconds, e.g. 200"
TOKENS = "give a number of tokens from 1 to 16777216"


def _compare(tmp_path: Path, args: list[str]) -> Result:
    """`bench compare` of the tiny model on CPU at 2 req/s, with `args` (a flag of `args` replaces TINY's)."""
    given = set(args[::2])
    base = [item for flag, value in zip(TINY_COMPARE[::2], TINY_COMPARE[1::2], strict=True) if flag not in given
            for item in (flag, value)]
    rates = [] if "--rates" in given else ["--rates", "2"]
    return CliRunner().invoke(bench_app, ["compare", *base, *rates, *args, "--out", str(tmp_path / "out")])


def _refused(result: Result, line: str) -> None:
    text = " ".join(result.output.split())
    assert result.exit_code == 1, text
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in text and "Input should" not in text, text
    assert f"error: {line}" in text, text


@pytest.mark.parametrize(("args", "line"), [
    (["--num-prompts", "0"], "--num-prompts: 0 must be at least 1; give a number of requests per rate from 1 to "
                             "1000000, e.g. 160"),
    (["--num-prompts", "-3"], "--num-prompts: -3 must be at least 1; give a number of requests per rate"),
    (["--num-prompts", "1000001"], "--num-prompts: 1000001 must be at most 1000000; give a number of requests"),
    (["--duration", "0"], "--duration: 0 must be greater than 0; give a positive number of seconds, e.g. 60"),
    (["--duration", "-1.5"], "--duration: -1.5 must be greater than 0; give a positive number of seconds"),
    (["--input-len", "0"], f"--input-len: 0 must be at least 1; {TOKENS}, e.g. 3072"),
    (["--input-len", "16777217"], f"--input-len: 16777217 must be at most 16777216; {TOKENS}"),
    (["--output-len", "-1"], f"--output-len: -1 must be at least 1; {TOKENS}, e.g. 128"),
    (["--input-lens", "64,0"], "--input-lens: item 2: 0 must be at least 1; give prompt lengths from 1 to 16777216 "
                               "tokens, e.g. 64,3072"),
    (["--ttft-slo-ms", "0"], f"--ttft-slo-ms: 0 must be greater than 0; {MS}"),
    (["--tpot-slo-ms", "-5"], f"--tpot-slo-ms: -5 must be greater than 0; {MS}"),
    (["--tight-ttft-slo-ms", "0"], f"--tight-ttft-slo-ms: 0 must be greater than 0; {MS}"),
    (["--tight-tpot-slo-ms", "-0.5"], f"--tight-tpot-slo-ms: -0.5 must be greater than 0; {MS}"),
    (["--advise-for", "loose"], "--advise-for: 'loose' must be 'relaxed' or 'tight'; give relaxed (the SLOs of "
                                "--ttft-slo-ms and --tpot-slo-ms) or tight"),
    (["--advise-for", ""], "--advise-for: '' must be 'relaxed' or 'tight'"),
    (["--device", "gpu"], "--device: 'gpu' must be 'auto', 'cpu' or 'cuda'; give auto, cpu or cuda"),
    (["--colocated-instances", "0"], "--colocated-instances: 0 must be at least 1; give a positive number of "
                                     "instances, or drop the flag"),
    (["--disaggregate-min-tokens", "0"], "--disaggregate-min-tokens: 0 must be at least 1; give a positive number "
                                         "of prompt tokens, e.g. 256"),
    (["--disaggregate-min-tokens", "4", "--disaggregate-max-queue-tokens", "-1"],
     "--disaggregate-max-queue-tokens: -1 must be at least 1; give a positive number of queued prompt tokens"),
    (["--disaggregate-min-tokens", "4", "--disaggregate-max-itl-ms", "0"],
     f"--disaggregate-max-itl-ms: 0 must be greater than 0; {MS}"),
    (["--prefill", "0"], "--prefill: 0 must be at least 1; give a positive number of prefill instances, e.g. 1"),
    (["--decode", "-2"], "--decode: -2 must be at least 1; give a positive number of decode instances, e.g. 1"),
    (["--burstiness", "0"], "--burstiness: 0 must be greater than 0; give a positive gamma shape"),
    (["--seed", "-1"], "--seed: -1 must be at least 0; give a seed of 0 or more, e.g. 0"),
    (["--num-warmups", "-1"], "--num-warmups: -1 must be at least 0; give a number of requests from 0 to 1000000"),
    (["--vocab-size", "10"], "--vocab-size: 10 must be greater than 10; give the vocabulary size prompt token ids "
                             "are drawn below"),
    (["--max-model-len", "0"], "--max-model-len: 0 must be at least 1; give a positive number of tokens"),
    (["--request-timeout", "0"], "--request-timeout: 0 must be greater than 0; give a positive number of seconds, "
                                 "e.g. 600"),
    (["--request-timeout", "1e9"], "--request-timeout: 1000000000 must be at most 604770; give a positive number "
                                   "of seconds, e.g. 600 (at most 604770)"),
    (["--ready-timeout", "-1"], "--ready-timeout: -1 must be greater than 0; give a positive number of seconds"),
    (["--ready-timeout", "604801"], "--ready-timeout: 604801 must be at most 604800"),
])
def test_a_bad_number_or_choice_names_the_flag_the_value_and_what_to_give(tmp_path: Path, args: list[str],
                                                                            line: str) -> None:
    result = _compare(tmp_path, args)
    _refused(result, line)
    assert not (tmp_path / "out").exists()  # refused before anything starts


@pytest.mark.parametrize(("rates", "line"), [
    ("2,x,4", "--rates: 'x' in '2,x,4' is not a number; give numbers separated by commas, e.g. 2,4,8"),
    ("2,,4", "--rates: '2,,4' has an empty item; give numbers separated by single commas, e.g. 2,4,8"),
    ("", "--rates: '' is empty; give numbers separated by commas, e.g. 2,4,8"),
    (" , ", "--rates: ' , ' is empty; give numbers separated by commas"),
    ("2,0", "--rates: 0 is not a positive number of requests/s; give positive, finite rates, e.g. 2,4,8"),
    ("-1", "--rates: -1 is not a positive number of requests/s"),
    ("nan,2", "--rates: nan is not a positive number of requests/s"),
    ("2,inf", "--rates: inf is not a positive number of requests/s"),
    ("2,4,2", "--rates: 2 is listed twice; give each rate once, e.g. 2,4,8"),
    ("2,2.0", "--rates: 2 is listed twice"),
])
def test_a_bad_rate_list_names_the_rate_and_the_list(tmp_path: Path, rates: str, line: str) -> None:
    _refused(_compare(tmp_path, ["--rates", rates]), line)


@pytest.mark.parametrize(("args", "line"), [
    (["--gpus", "0,x"], "--gpus: 'x' in '0,x' is not an integer; give integers separated by commas, e.g. 0,1"),
    (["--input-lens", "64,3k"], "--input-lens: '3k' in '64,3k' is not an integer; give integers separated by "
                                "commas, e.g. 64,3072"),
    (["--input-lens", "1.5"], "--input-lens: '1.5' in '1.5' is not an integer"),
])
def test_a_bad_item_of_an_integer_list_is_named(tmp_path: Path, args: list[str], line: str) -> None:
    _refused(_compare(tmp_path, args), line)


def test_unsorted_rates_are_run_in_order(tmp_path: Path) -> None:
    """Unsorted rates are not a mistake: they are run lowest first (no error to give)."""
    from pdlaunch.bench.compare_config import CompareConfig

    assert CompareConfig(model="tiny", rates=[8, 2, 4], out=tmp_path).rates == [2, 4, 8]


@pytest.mark.parametrize(("args", "line"), [
    (["--num-prompts", "x"], "Invalid value for '--num-prompts': 'x' is not a valid integer; give a whole number, "
                             "e.g. 160"),
    (["--num-prompts", "1.5"], "Invalid value for '--num-prompts': '1.5' is not a valid integer"),
    (["--seed", ""], "Invalid value for '--seed': '' is not a valid integer; give a whole number, e.g. 0"),
    (["--ttft-slo-ms", "fast"], "Invalid value for '--ttft-slo-ms': 'fast' is not a valid number; give a number, "
                                "e.g. 400"),
    (["--duration", "1m"], "Invalid value for '--duration': '1m' is not a valid number; give a number"),
])
def test_a_value_of_the_wrong_type_is_shown_with_what_to_give(tmp_path: Path, args: list[str], line: str) -> None:
    """typer reads these before pdlaunch sees them: its message said `Input should be a valid integer, unable to
    parse string as an integer`, without the value."""
    from pdlaunch.cli import app

    result = CliRunner().invoke(app, ["bench", "compare", *TINY_COMPARE, "--rates", "2", *args,
                                      "--out", str(tmp_path / "out")], terminal_width=1000, env={"COLUMNS": "1000"})
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 1, text
    assert line in text and "Input should" not in text, text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "line"), [
    (["--num-prompts", "0"], "--num-prompts: 0 must be at least 1; give a number of requests from 1 to 1000000, "
                             "e.g. 1000"),
    (["--random-input-len", "0"], f"--random-input-len: 0 must be at least 1; {TOKENS}, e.g. 1024"),
    (["--random-output-len", "16777217"], f"--random-output-len: 16777217 must be at most 16777216; {TOKENS}"),
    (["--input-lens", "0,8"], "--input-lens: item 1: 0 must be at least 1; give prompt lengths from 1 to 16777216 "
                              "tokens, e.g. 64,3072"),
    (["--random-range-ratio", "1"], "--random-range-ratio: 1 must be less than 1; give a ratio from 0 up to"),
    (["--max-concurrency", "0"], "--max-concurrency: 0 must be at least 1; give a positive number of requests in "
                                 "flight, or drop the flag"),
    (["--num-warmups", "-1"], "--num-warmups: -1 must be at least 0; give a number of requests from 0 to 1000000"),
    (["--prompt-format", "text"], "--prompt-format: 'text' must be 'ids' or 'words'; give ids (token ids, for "
                                  "/v1/completions) or words"),
    (["--vocab-size", "5"], "--vocab-size: 5 must be greater than 10; give the vocabulary size"),
    (["--seed", "-1"], "--seed: -1 must be at least 0; give a seed of 0 or more"),
    (["--multi-turn", "--num-conversations", "0"], "--num-conversations: 0 must be at least 1; give a positive "
                                                   "number of conversations"),
    (["--multi-turn", "--num-turns", "0"], "--num-turns: 0 must be at least 1; give a positive number of turns"),
    (["--multi-turn", "--system-prompt-len", "-1"], "--system-prompt-len: -1 must be at least 0; give a number of "
                                                    "tokens from 0 to 16777216"),
    (["--multi-turn", "--last-answer-len", "0"], f"--last-answer-len: 0 must be at least 1; {TOKENS}, or drop"),
])
def test_bench_serve_says_it_the_same_way(args: list[str], line: str) -> None:
    """`bench serve`'s number and choice flags, in the words of `bench compare`'s (its float flags already were)."""
    result = CliRunner().invoke(bench_app, ["serve", "--base-url", "http://127.0.0.1:9", *args])
    _refused(result, line)
