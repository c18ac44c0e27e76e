"""`pdlaunch bench serve` against a server whose /v1/models lists a max_model_len: a workload whose longest request
does not fit is refused before any request is sent, naming the flags that size it (the defaults, 1024 + 128 tokens,
against the CPU example's max_model_len 1024 had every request fail with a 400 and a hint to check --base-url)."""

from __future__ import annotations

import pytest
from click.testing import Result
from typer.testing import CliRunner

from pdlaunch.bench.cli import bench_app
from tests.bench.fake_openai import MODEL, fake_server

runner = CliRunner()


def _serve(url: str, *extra: str) -> Result:
    return runner.invoke(bench_app, ["serve", "--base-url", url, *extra])


def test_the_default_lengths_past_the_served_max_model_len_are_refused_before_any_request() -> None:
    with fake_server(max_model_len=1024) as (url, seen):
        result = _serve(url, "--num-prompts", "3")
    assert result.exit_code == 1, result.output
    assert seen == []
    text = " ".join(result.output.split())
    assert "Traceback" not in text
    assert (f"--random-input-len: prompts of up to 1024 tokens + outputs of up to 128 (--random-output-len) need 1152 "
            f"tokens, more than the max_model_len 1024 that {url}/v1/models lists for '{MODEL}'") in text
    assert "pass --random-input-len 896 or less with this --random-output-len, or a smaller --random-output-len" in text


def test_the_range_ratio_counts_the_longest_draws() -> None:
    with fake_server(max_model_len=100) as (url, seen):
        result = _serve(url, "--num-prompts", "3", "--random-input-len", "80", "--random-output-len", "10",
                        "--random-range-ratio", "0.2")
    assert result.exit_code == 1, result.output
    assert seen == []
    text = " ".join(result.output.split())
    assert "prompts of up to 96 tokens + outputs of up to 12 (--random-output-len) need 108 tokens" in text
    # 73 * 1.2 rounds up to 88, and 88 + 12 fits 100; 74 * 1.2 -> 89 would not
    assert "pass --random-input-len 73 or less with this --random-output-len" in text


def test_an_input_lens_mix_is_named_by_its_flag() -> None:
    with fake_server(max_model_len=64) as (url, seen):
        result = _serve(url, "--num-prompts", "4", "--input-lens", "8,60", "--random-output-len", "8")
    assert result.exit_code == 1, result.output
    assert seen == []
    text = " ".join(result.output.split())
    assert "--input-lens: prompts of up to 60 tokens + outputs of up to 8 (--random-output-len) need 68 tokens" in text


def test_chat_prompts_are_counted_in_words_as_a_lower_bound() -> None:
    with fake_server(max_model_len=64) as (url, seen):
        result = _serve(url, "--num-prompts", "2", "--endpoint", "/v1/chat/completions",
                        "--random-input-len", "60", "--random-output-len", "8")
    assert result.exit_code == 1, result.output
    assert seen == []
    text = " ".join(result.output.split())
    assert "need at least 68 tokens" in text
    assert "pass --random-input-len below 56 (a word is a token or more, and a chat template adds its own)" in text


def test_a_multi_turn_conversation_is_counted_at_its_last_turn() -> None:
    with fake_server(max_model_len=512) as (url, seen):
        result = _serve(url, "--multi-turn", "--num-conversations", "2", "--num-turns", "4",
                        "--system-prompt-len", "64", "--random-input-len", "64", "--random-output-len", "64")
    assert result.exit_code == 1, result.output
    assert seen == []
    text = " ".join(result.output.split())
    assert ("--num-turns: a conversation's last turn needs 576 tokens (--system-prompt-len 64 + --num-turns 4 x "
            "(--random-input-len 64 + --random-output-len 64)), more than the max_model_len 512") in text
    assert "lower --num-turns, --random-input-len, --random-output-len or --system-prompt-len" in text


def test_a_short_last_answer_is_counted_as_asked() -> None:
    """--last-answer-len 8: the last turn needs 64 + 4 x 64 + 3 x 64 + 8 = 520 tokens (576 with every answer 64),
    which a max_model_len of 520 holds and 512 does not."""
    shape = ["--multi-turn", "--num-conversations", "2", "--num-turns", "4", "--system-prompt-len", "64",
             "--random-input-len", "64", "--random-output-len", "64"]
    with fake_server(max_model_len=520) as (url, seen):
        result = _serve(url, *shape, "--last-answer-len", "8")
    assert "last turn needs" not in result.output, result.output
    with fake_server(max_model_len=512) as (url, seen):
        result = _serve(url, *shape, "--last-answer-len", "8")
    assert result.exit_code == 1, result.output
    assert seen == []
    text = " ".join(result.output.split())
    assert ("--num-turns: a conversation's last turn needs 520 tokens (--system-prompt-len 64 + --num-turns 4 x "
            "--random-input-len 64 + 3 x --random-output-len 64 + --last-answer-len 8), more than the max_model_len "
            "512") in text
    assert ("lower --num-turns, --random-input-len, --random-output-len, --last-answer-len or --system-prompt-len"
            in text)


def test_a_workload_that_fits_runs() -> None:
    with fake_server(max_model_len=1024) as (url, seen):
        result = _serve(url, "--num-prompts", "3", "--random-input-len", "896", "--random-output-len", "128")
    assert result.exit_code == 0, result.output
    assert len(seen) == 3


def test_a_model_named_with_model_is_checked_against_its_own_entry() -> None:
    with fake_server(max_model_len=32) as (url, seen):
        result = _serve(url, "--model", MODEL, "--num-prompts", "2", "--random-input-len", "30",
                        "--random-output-len", "4")
    assert result.exit_code == 1, result.output
    assert seen == []
    assert f"max_model_len 32 that {url}/v1/models lists for '{MODEL}'" in " ".join(result.output.split())



@pytest.mark.parametrize("lengths", [["--random-output-len", "600"],
                                     ["--random-output-len", "400", "--random-range-ratio", "0.5"]])
def test_outputs_alone_past_the_limit_name_the_output_flag_and_no_negative_length(lengths: list[str]) -> None:
    """Outputs of up to 600 tokens against a max_model_len of 512 leave no room for any prompt: the hint said `pass
    --random-input-len -88 or less` (-59 with the ratio), a length no flag takes, under a --random-input-len field."""
    with fake_server(max_model_len=512) as (url, seen):
        result = _serve(url, "--num-prompts", "2", "--random-input-len", "16", *lengths)
    assert result.exit_code == 1, result.output
    assert seen == []
    text = " ".join(result.output.split())
    assert "--random-output-len: prompts of up to" in text
    assert "(pass a smaller --random-output-len)" in text
    assert "or less" not in text
