"""`pdlaunch bench serve` end to end against a real streaming HTTP server (numbers not asserted)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pdlaunch.bench.cli import bench_app
from tests.bench.fake_openai import MODEL, fake_server
from tests.helpers.ports import free_port

runner = CliRunner()


def _serve(url: str, *extra: str) -> object:
    return runner.invoke(bench_app, ["serve", "--base-url", url, *extra])


def test_bench_serve_completes_every_request_and_saves_json(tmp_path: Path) -> None:
    out = tmp_path / "res.json"
    with fake_server() as (url, seen):
        result = _serve(url, "--num-prompts", "12", "--random-input-len", "16", "--random-output-len", "6",
                        "--random-range-ratio", "0.5", "--request-rate", "200", "--max-concurrency", "4",
                        "--num-warmups", "2", "--goodput", "ttft:5000", "tpot:5000",
                        "--save-result", "--result-filename", str(out))
    assert result.exit_code == 0, result.output
    assert "Successful requests" in result.output and "TTFT" in result.output
    doc = json.loads(out.read_text())
    assert doc["completed"] == 12 and doc["failed"] == 0
    assert doc["model_id"] == MODEL  # picked from /v1/models
    for key in ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "mean_itl_ms", "mean_e2el_ms",
                "request_throughput", "output_throughput", "total_token_throughput", "request_goodput", "duration"):
        assert isinstance(doc[key], float), key
    measured = seen[2:]  # the first two were warmups
    assert len(measured) == 12
    assert all(body["ignore_eos"] and body["stream"] for body in measured)
    # output lengths are exact: what the server reported equals what was asked
    assert sorted(doc["output_lens"]) == sorted(body["max_tokens"] for body in measured)
    assert sorted(doc["input_lens"]) == sorted(len(body["prompt"]) for body in measured)
    # every streamed token but the first gives one ITL gap
    assert [len(gaps) for gaps in doc["itls"]] == [n - 1 for n in doc["output_lens"]]


def test_input_lens_send_the_mix(tmp_path: Path) -> None:
    out = tmp_path / "mix.json"
    with fake_server() as (url, seen):
        result = _serve(url, "--num-prompts", "10", "--input-lens", "4,24", "--random-output-len", "3",
                        "--save-result", "--result-filename", str(out))
    assert result.exit_code == 0, result.output
    assert sorted(len(body["prompt"]) for body in seen) == [4] * 5 + [24] * 5
    doc = json.loads(out.read_text())
    assert doc["input_len_mix"] == [4, 24] and sorted(doc["input_lens"]) == [4] * 5 + [24] * 5


def test_chat_endpoint_with_explicit_model() -> None:
    with fake_server() as (url, seen):
        result = _serve(url, "--endpoint", "/v1/chat/completions", "--model", "m1", "--num-prompts", "3",
                        "--random-input-len", "5", "--random-output-len", "3")
    assert result.exit_code == 0, result.output
    assert [body["model"] for body in seen] == ["m1"] * 3
    assert all(isinstance(body["messages"][0]["content"], str) for body in seen)


def test_failed_requests_are_counted_and_first_errors_shown(tmp_path: Path) -> None:
    out = tmp_path / "res.json"
    with fake_server(fail_every=3) as (url, _):
        result = _serve(url, "--num-prompts", "9", "--random-input-len", "4", "--random-output-len", "3",
                        "--result-filename", str(out))
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert (doc["completed"], doc["failed"]) == (6, 3)
    assert "3 request(s) failed" in result.output
    assert "HTTP 500" in result.output and "planted failure" in result.output
    assert "Traceback" not in result.output


def test_all_requests_failing_exits_1_with_the_error() -> None:
    with fake_server(fail_every=1) as (url, _):
        result = _serve(url, "--model", "m", "--num-prompts", "2", "--random-input-len", "4",
                        "--random-output-len", "2")
    assert result.exit_code == 1
    assert "all 2 requests failed" in result.output and "planted failure" in result.output


def test_connection_refused_names_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = _serve(url, "--num-prompts", "2")
    assert result.exit_code == 1
    assert f"cannot connect to {url}" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--random-range-ratio", "1.5"], "--random-range-ratio"),
        (["--num-prompts", "0"], "--num-prompts"),
        (["--goodput", "ttfb:10"], "--goodput"),
        (["--goodput", "ttft:10", "oops"], "unexpected argument"),
        (["--input-lens", "64,x"], "--input-lens"),
        (["--input-lens", "64,0"], "--input-lens"),
    ],
)
def test_bad_options_exit_1_naming_the_flag(args: list[str], message: str) -> None:
    result = _serve("http://127.0.0.1:9", *args)
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output


def test_plot_without_matplotlib_says_how_to_install_before_running(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with fake_server() as (url, seen):
        result = _serve(url, "--num-prompts", "2", "--plot", "plots")
    assert result.exit_code == 1
    assert "pip install matplotlib" in result.output
    assert seen == []  # refused before any request


def test_plot_writes_pngs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    with fake_server() as (url, _):
        result = _serve(url, "--num-prompts", "4", "--random-input-len", "4", "--random-output-len", "4",
                        "--plot", str(tmp_path))
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["e2el.png", "itl.png", "latency_over_time.png", "tpot.png", "ttft.png"]


@pytest.mark.e2e
def test_kv_transfer_command_prints_rows_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "kv.json"
    result = runner.invoke(bench_app, [
        "kv-transfer", "--device", "cpu", "--mode", "push", "--num-tokens", "17", "--num-layers", "2",
        "--num-kv-heads", "2", "--head-dim", "16", "--dtype", "float32", "--block-size", "8", "--iterations", "1",
        "--json", str(out),
    ])
    assert result.exit_code == 0, result.output
    assert "KV transfer through the connector" in result.output and "push" in result.output
    (row,) = json.loads(out.read_text())
    assert row["mode"] == "push" and row["num_tokens"] == 17 and row["verified"] is True
    # 2 blocks (the last prompt token is recomputed) of 2 layers x (k, v) x 8 tokens x 2 heads x 16 x fp32
    assert row["bytes"] == 2 * (2 * 2 * 8 * 2 * 16 * 4)


def test_kv_transfer_rejects_unknown_mode() -> None:
    result = runner.invoke(bench_app, ["kv-transfer", "--mode", "teleport"])
    assert result.exit_code == 1 and "--mode" in result.output


def test_request_timeout_bounds_a_whole_request() -> None:
    # 200 chunks at >= 1 ms each cannot finish within 50 ms, however fast the first chunk comes
    with fake_server() as (url, _):
        result = _serve(url, "--num-prompts", "2", "--random-input-len", "4", "--random-output-len", "200",
                        "--request-timeout", "0.05")
    assert result.exit_code == 1
    assert "all 2 requests failed" in result.output and "timed out after 0.05s" in result.output


def test_the_timed_run_does_not_walk_the_heap_it_started_with(monkeypatch: pytest.MonkeyPatch) -> None:
    """Warm-ups run with the heap as it is; the timed requests with everything held before them frozen out of the
    collector's walks; afterwards the heap is as it was."""
    import gc

    from pdlaunch.bench import serve
    from pdlaunch.bench.openai_client import send_request as send

    frozen_while_sending: list[int] = []

    async def counting(*args: object, **kwargs: object) -> object:
        frozen_while_sending.append(gc.get_freeze_count())
        return await send(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(serve, "send_request", counting)
    before = gc.get_freeze_count()  # 0 unless an engine of an earlier test in this process froze its heap
    with fake_server() as (url, _):
        result = _serve(url, "--num-prompts", "3", "--random-input-len", "4", "--random-output-len", "2",
                        "--num-warmups", "1")
    assert result.exit_code == 0, result.output
    assert frozen_while_sending[0] == before, frozen_while_sending  # the warm-up
    assert len(frozen_while_sending) == 4 and all(n > before for n in frozen_while_sending[1:]), frozen_while_sending
    assert gc.get_freeze_count() == 0 if before == 0 else gc.get_freeze_count() >= before
