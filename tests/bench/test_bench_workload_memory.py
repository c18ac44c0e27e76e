"""A `bench serve` or `bench compare` workload whose prompts cannot fit in the memory available is refused before
anything is drawn, sent or started, naming the flags that size it: drawing it swapped the machine for minutes, then
the kernel killed the command, with no word of which flag to lower."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from pdlaunch.bench import workload_size
from pdlaunch.bench.cli import bench_app
from pdlaunch.bench.serve_config import ServeBenchConfig
from tests.bench.fake_openai import fake_server

TINY_COMPARE = ["--model", "tiny", "--device", "cpu", "--input-len", "12", "--output-len", "4", "--max-model-len", "64",
                "--rates", "2"]


def _refused(result: Any, flag: str) -> str:
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert f"error: {flag}: the workload needs about" in text, text
    assert "Traceback" not in result.output
    return text


def test_serve_prompts_larger_than_any_memory_are_refused_before_a_request() -> None:
    with fake_server() as (url, seen):
        result = CliRunner().invoke(bench_app, ["serve", "--base-url", url, "--num-prompts", "1000000",
                                                "--random-input-len", str(2**24)])
    text = _refused(result, "--num-prompts")
    assert "1000000 prompts of up to 16777216 tokens" in text and "lower --num-prompts or --random-input-len" in text
    assert seen == []


def test_serve_multi_turn_histories_larger_than_memory_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workload_size, "available_memory_bytes", lambda: 2**20)
    with fake_server() as (url, seen):
        result = CliRunner().invoke(bench_app, ["serve", "--base-url", url, "--multi-turn", "--num-conversations",
                                                "1000", "--num-turns", "10", "--random-input-len", "100"])
    text = _refused(result, "--num-conversations")
    assert "lower --num-conversations, --num-turns or --random-input-len" in text
    assert seen == []


def test_compare_workload_larger_than_memory_is_refused_before_a_deployment(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workload_size, "available_memory_bytes", lambda: 2**20)
    result = CliRunner().invoke(bench_app, ["compare", *TINY_COMPARE, "--num-prompts", "100000",
                                            "--out", str(tmp_path / "out")])
    text = _refused(result, "--num-prompts")
    assert "lower --num-prompts or --input-len" in text
    assert not (tmp_path / "out" / "colocated.json").exists()


def test_multi_turn_requests_are_bounded_like_independent_ones() -> None:
    """1000000 conversations x 1000000 turns: each factor within its bound, the product 10**12 requests."""
    result = CliRunner().invoke(bench_app, ["serve", "--base-url", "http://127.0.0.1:1", "--multi-turn",
                                            "--num-conversations", "1000000", "--num-turns", "1000000"])
    assert result.exit_code == 1, result.output
    assert "--num-conversations 1000000 x --num-turns 1000000 is 1000000000000 requests" in \
        " ".join(result.output.split())


@pytest.mark.parametrize(("kwargs", "per_token"), [
    ({"vocab_size": 200}, 8.0),  # every id below 257: CPython's shared int objects, only the list slot
    ({"vocab_size": 2**20}, 8.0 + 28 * (1 - 247 / (2**20 - 10))),
    ({"endpoint": "/v1/chat/completions"}, workload_size.WORD_BYTES),
])
def test_bytes_per_token(kwargs: dict[str, Any], per_token: float) -> None:
    cfg = ServeBenchConfig(base_url="http://127.0.0.1:8000", **kwargs)
    assert workload_size.bytes_per_token(cfg) == pytest.approx(per_token)


def test_a_workload_that_fits_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ServeBenchConfig(base_url="http://127.0.0.1:8000", num_prompts=10, num_warmups=2, random_input_len=100,
                           random_range_ratio=0.5)
    assert workload_size.tokens_held(cfg) == 12 * 150
    monkeypatch.setattr(workload_size, "available_memory_bytes", lambda: 12 * 150 * 40)
    workload_size.check_workload_fits(cfg)
