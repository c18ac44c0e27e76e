"""Bad input to `pdlaunch bench ...` exits 1 with a line naming the flag, before any work it would waste: never an
exception out of the command (a traceback), a hang, or a value quietly dropped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from pdlaunch.bench.cli import bench_app
from tests.bench.fake_openai import fake_server
from tests.helpers.ports import free_port

SMALL = ["--num-prompts", "2", "--random-input-len", "4", "--random-output-len", "2"]
KV_SMALL = ["--device", "cpu", "--mode", "pull", "--num-tokens", "9", "--num-layers", "2", "--num-kv-heads", "1",
            "--head-dim", "8", "--block-size", "8", "--iterations", "1"]
TINY_COMPARE = ["--model", "tiny", "--device", "cpu", "--input-len", "12", "--output-len", "4", "--max-model-len", "64",
                "--rates", "2"]  # passes every check up to the baseline's


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(bench_app, list(args))


def _replacing(base: list[str], args: list[str]) -> list[str]:
    """`base` (flag, value pairs) with the flags `args` gives set to its values instead: a flag is given once."""
    given = set(args[::2])
    return [item for flag, value in zip(base[::2], base[1::2], strict=True) if flag not in given
            for item in (flag, value)] + args


def _assert_refused(result: Any, flag: str) -> None:
    """Exit 1 through typer.Exit (not an exception escaping the command), the message naming `flag`."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert f"error: {flag}" in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output


def _closed_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.mark.parametrize("url", ["notaurl", "127.0.0.1:8000", "", "ftp://host", "http://", "http://127.0.0.1:abc",
                                 "http://127.0.0.1:99999", "http://[::1"])
def test_serve_malformed_base_url(url: str) -> None:
    _assert_refused(_invoke("serve", "--base-url", url, *SMALL), "--base-url")


@pytest.mark.parametrize(("args", "flag"), [
    # past numpy's int64 draws (or negative seeds): refused before the workload is drawn
    (["--seed", "-1"], "--seed"),
    (["--num-prompts", str(10**20)], "--num-prompts"),
    (["--random-input-len", str(10**20)], "--random-input-len"),
    (["--random-output-len", str(10**20)], "--random-output-len"),
    (["--vocab-size", str(10**20)], "--vocab-size"),
    (["--input-lens", f"4,{10**20}"], "--input-lens"),
    # a value left out of a list is a typo, not something to drop
    (["--input-lens", "4,,8"], "--input-lens"),
    (["--input-lens", "4,8,"], "--input-lens"),
    # an SLO that no latency meets (NaN), or one given twice (the first silently replaced)
    (["--goodput", "ttft:nan"], "--goodput"),
    (["--goodput", "ttft:100", "--goodput", "ttft:200"], "--goodput"),
    (["--result-filename", ""], "--result-filename"),
    # token-id prompts to a chat endpoint, alone or in multi-turn mode: the flag first, not a sentence about it
    (["--endpoint", "/v1/chat/completions", "--prompt-format", "ids"], "--prompt-format: ids"),
    (["--multi-turn", "--endpoint", "/v1/chat/completions", "--prompt-format", "ids"], "--prompt-format: ids"),
    # gaps no float holds: rate x burstiness underflowed to 0 (a ZeroDivisionError traceback once the server answered)
    (["--request-rate", "1e-200", "--burstiness", "1e-200"], "--request-rate: 1e-200 requests/s"),
    (["--multi-turn", "--request-rate", "1e-307", "--burstiness", "0.01"], "--request-rate: 1e-307 requests/s"),
])
def test_serve_bad_numbers_and_lists(args: list[str], flag: str) -> None:
    _assert_refused(_invoke("serve", "--base-url", _closed_url(), *args), flag)


def test_serve_multi_turn_huge_turns() -> None:
    _assert_refused(_invoke("serve", "--base-url", _closed_url(), "--multi-turn", "--num-turns", str(10**20)),
                    "--num-turns")


@pytest.mark.parametrize(("args", "flag"), [
    (["--save-result", "--result-dir", "{file}"], "--result-dir"),
    (["--result-filename", "{file}/res.json"], "--result-filename"),
    (["--result-filename", "{dir}"], "--result-filename"),
    (["--plot", "{file}"], "--plot"),
])
def test_serve_unwritable_output_is_refused_before_the_run(tmp_path: Path, args: list[str], flag: str) -> None:
    """A result or plot path that cannot be written fails before any request, not after the whole run."""
    if flag == "--plot":
        pytest.importorskip("matplotlib")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    args = [a.format(file=a_file, dir=tmp_path) for a in args]
    with fake_server() as (url, seen):
        result = _invoke("serve", "--base-url", url, *SMALL, *args)
    _assert_refused(result, flag)
    assert seen == []


def test_serve_multi_turn_unwritable_output_is_refused_before_the_run(tmp_path: Path) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with fake_server() as (url, seen):
        result = _invoke("serve", "--base-url", url, "--multi-turn", "--num-conversations", "1", "--num-turns", "1",
                         "--random-input-len", "4", "--random-output-len", "2", "--system-prompt-len", "2",
                         "--result-filename", str(a_file / "res.json"))
    _assert_refused(result, "--result-filename")
    assert seen == []


@pytest.mark.parametrize(("args", "flag"), [
    (["--num-tokens", "1"], "--num-tokens"),
    (["--num-tokens", "0"], "--num-tokens"),
    (["--block-size", "0"], "--block-size"),
    (["--block-size", "-1"], "--block-size"),
    (["--block-size", "7"], "--block-size"),  # serve takes 8, 16, 32, 64 or 128
    (["--iterations", "0"], "--iterations"),
    (["--timeout", "0"], "--timeout"),
    (["--timeout", "nan"], "--timeout"),
    (["--num-layers", "0"], "--num-layers"),
    (["--num-kv-heads", "0"], "--num-kv-heads"),
    (["--head-dim", "0"], "--head-dim"),
    (["--dtype", "float8"], "--dtype"),
    (["--kv-cache-dtype", "int4"], "--kv-cache-dtype"),
    (["--device", "gpu0"], "--device"),
    (["--device", "cuda:99"], "--device"),
    (["--decode-device", "gpu1"], "--decode-device"),
    (["--json", "{file}/kv.json"], "--json"),
    (["--json", "{dir}"], "--json"),
])
def test_kv_transfer_bad_input_is_refused_before_the_workers_start(tmp_path: Path, args: list[str],
                                                                   flag: str) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    args = [a.format(file=a_file, dir=tmp_path) for a in args]
    _assert_refused(_invoke("kv-transfer", *_replacing(KV_SMALL, args)), flag)


@pytest.mark.e2e
def test_kv_transfer_worker_that_cannot_start_fails_at_once() -> None:
    """A KV cache no machine can hold (10**15 tokens, beyond the address space): the worker says so right away;
    it used to die silently while the parent waited 300 s for its answer."""
    pytest.importorskip("nixl")
    result = _invoke("kv-transfer", *_replacing(KV_SMALL, ["--num-tokens", str(10**15)]))
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    flat = " ".join(result.output.split())
    assert "prefill start failed" in flat and "--num-tokens" in flat
    assert "Traceback" not in result.output


@pytest.mark.parametrize(("args", "flag"), [
    (["--max-shard-gib", "nan"], "--max-shard-gib"),
    (["--max-shard-gib", "inf"], "--max-shard-gib"),
    (["--max-shard-gib", "0"], "--max-shard-gib"),
    (["--max-shard-gib", "-1"], "--max-shard-gib"),
    (["--seed", str(10**20)], "--seed"),
])
def test_make_checkpoint_bad_numbers_write_nothing(tmp_path: Path, args: list[str], flag: str) -> None:
    out = tmp_path / "ckpt"
    _assert_refused(_invoke("make-checkpoint", str(out), *args), flag)
    assert not out.exists()


def test_make_checkpoint_into_a_file(tmp_path: Path) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    _assert_refused(_invoke("make-checkpoint", str(a_file)), "OUT_DIR")
    _assert_refused(_invoke("make-checkpoint", str(a_file / "sub"), "--device", "cpu"), "OUT_DIR")
    assert a_file.read_text() == ""


@pytest.mark.parametrize(("args", "flag"), [
    # refused with the other flags, not once the first deployment is up and its workload is drawn
    (["--rates", "2", "--seed", "-1"], "--seed"),
    (["--rates", "2", "--vocab-size", str(10**20)], "--vocab-size"),
    (["--rates", "2", "--num-prompts", str(10**20)], "--num-prompts"),
    (["--rates", "2", "--duration", "1e9"], "--duration"),
    (["--rates", "1,,2"], "--rates"),
    (["--rates", "2,"], "--rates"),
])
def test_compare_bad_input_is_refused_before_anything_starts(tmp_path: Path, args: list[str], flag: str) -> None:
    _assert_refused(_invoke("compare", "--model", "tiny", *args, "--out", str(tmp_path / "out")), flag)


def test_compare_baseline_of_the_wrong_shape(tmp_path: Path) -> None:
    baseline = tmp_path / "baseline"
    baseline.mkdir()
    (baseline / "compare.json").write_text(json.dumps({"settings": ["not", "a", "mapping"]}))
    for kind in ("colocated", "pd"):
        (baseline / f"{kind}.json").write_text(json.dumps({"kind": kind, "label": kind, "description": kind}))
    result = _invoke("compare", *TINY_COMPARE, "--disaggregate-min-tokens", "8", "--baseline", str(baseline),
                     "--out", str(tmp_path / "out"))
    _assert_refused(result, "--baseline")


@pytest.mark.parametrize(("command", "args", "flag"), [
    ("compare", [*TINY_COMPARE, "--out", ""], "--out"),
    ("compare", [*TINY_COMPARE, "--out", "{out}", "--config", " "], "--config"),
    ("compare", [*TINY_COMPARE, "--out", "{out}", "--disaggregate-min-tokens", "8", "--baseline", ""], "--baseline"),
    ("serve", ["--base-url", "{url}", *SMALL, "--plot", ""], "--plot"),
    ("serve", ["--base-url", "{url}", *SMALL, "--save-result", "--result-dir", ""], "--result-dir"),
    ("kv-transfer", [*KV_SMALL, "--json", ""], "--json"),
])
def test_an_empty_path_is_refused_not_read_as_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  command: str, args: list[str], flag: str) -> None:
    """`--out "$OUT"` with OUT unset: typer reads "" as the current folder, where compare wrote its reports, runs and
    logs (and bench serve its plots or result) instead of the folder the user meant."""
    monkeypatch.chdir(tmp_path)
    with fake_server() as (url, seen):
        result = _invoke(command, *[a.format(url=url, out=tmp_path / "out") for a in args])
    _assert_refused(result, flag)
    assert "is empty (an unset variable?)" in result.output, result.output
    assert seen == [] and list(tmp_path.iterdir()) == []
