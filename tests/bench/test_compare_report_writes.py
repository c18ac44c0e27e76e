"""`bench compare` writing its files: an --out that cannot take them (a full disk, a folder where a file goes) is
one error line naming --out and the path, exit 1, after the report is printed; Ctrl-C or SIGTERM while the report
is printed or written exits 130 saying what was kept. Either way no file is left half-written: each is written
beside its name and renamed over it, so an earlier compare.json survives a failed write whole."""

from __future__ import annotations

import errno
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from typer.testing import CliRunner

from pdlaunch.bench import compare, compare_report
from pdlaunch.bench.cli import bench_app
from pdlaunch.bench.goodput import RatePoint
from pdlaunch.bench.matmul_ceiling import Yardstick
from pdlaunch.bench.rate_sweep import DeploymentRun
from pdlaunch.errors import PdlaunchError

ARGS = ["compare", "--model", "tiny", "--device", "cpu", "--rates", "2", "--input-len", "12", "--output-len", "4",
        "--max-model-len", "64"]


class Killed(Exception):
    """What SIGTERM raises here when compare does not turn it into an interrupt (the test then fails, not dies)."""


@pytest.fixture
def ran(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Deployment runs that finish at once with one rate point each; the kinds run, in order."""
    kinds: list[str] = []

    def run_deployment(cfg: Any, layout: Any, kind: str, *_: Any, **__: Any) -> DeploymentRun:
        kinds.append(kind)
        point = RatePoint(rate=2.0, num_prompts=4, completed=4, within_slo=4, duration_s=2.0, goodput=2.0,
                          served=2.0, ttft_p50_ms=10.0, ttft_p99_ms=20.0, tpot_p50_ms=1.0, tpot_p99_ms=2.0)
        return DeploymentRun(kind=kind, label=kind, description=f"the {kind} deployment", points=[point])

    monkeypatch.setattr(compare, "run_deployment", run_deployment)
    monkeypatch.setattr(compare, "prefill_yardstick",
                        lambda *_: Yardstick(input_len=12, flops_per_token=1.0, no_ceiling="not measured here"))
    return kinds


@pytest.fixture
def no_plot(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_matplotlib() -> None:
        raise PdlaunchError("--plot needs matplotlib, which is not installed")

    monkeypatch.setattr(compare_report, "require_matplotlib", no_matplotlib)


@pytest.fixture
def sigterm_fails_the_test() -> Iterator[None]:
    def killed(signum: int, _: FrameType | None) -> None:
        raise Killed

    previous = signal.signal(signal.SIGTERM, killed)
    yield
    signal.signal(signal.SIGTERM, previous)


def _invoke(out: Path) -> Any:
    """Wide enough that rich never breaks a long path inside a word (CI runs without a terminal: 80 columns)."""
    return CliRunner().invoke(bench_app, [*ARGS, "--out", str(out)], env={"COLUMNS": "1000"}, terminal_width=1000)


def _flat(text: str) -> str:
    return " ".join(text.split())


def _parts(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.endswith(".part"))


def _fail_writing(monkeypatch: pytest.MonkeyPatch, name: str, error: BaseException) -> None:
    """`error` where the data of the file being written as `name` reaches the disk (fsync: where a full disk says
    so); every other file is written as usual."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(f".{name}."):
            raise error
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.usefixtures("ran", "no_plot")
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names an open file through /proc")
def test_a_full_disk_is_one_line_after_the_report_and_the_earlier_json_stays(monkeypatch: pytest.MonkeyPatch,
                                                                              tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "compare.json").write_text('{"earlier": true}\n')
    _fail_writing(monkeypatch, "compare.json", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    result = _invoke(out)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    text = _flat(result.output)
    error = f"error: --out: could not write '{out / 'compare.json'}': No space left on device"
    assert error in text and "OUT/<kind>.json" in text
    assert text.index("keeps >= 90% of requests within the SLOs") < text.index(error)  # the figures came first
    assert json.loads((out / "compare.json").read_text()) == {"earlier": True}
    assert json.loads((out / "pd.json").read_text())["kind"] == "pd"
    assert _parts(out) == []


@pytest.mark.usefixtures("ran", "no_plot")
def test_a_file_that_cannot_replace_compare_json_is_named(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    (out / "compare.json").mkdir(parents=True)  # a folder where the file goes: the rename fails
    result = _invoke(out)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"error: --out: could not write '{out / 'compare.json'}': Is a directory" in _flat(result.output)
    assert _parts(out) == []


@pytest.mark.usefixtures("no_plot")
def test_a_deployment_file_that_cannot_be_written_stops_the_comparison(ran: list[str], tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    (out / "colocated.json").mkdir(parents=True)
    result = _invoke(out)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    text = _flat(result.output)
    assert f"error: --out: could not write '{out / 'colocated.json'}': Is a directory" in text
    assert "the colocated run's figures are not saved and the comparison stops" in text
    assert ran == ["colocated"] and not (out / "compare.json").exists() and _parts(out) == []


@pytest.mark.usefixtures("ran")
def test_a_plot_that_cannot_be_written_is_named_after_the_json(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "cmp"
    (out / "goodput.png").mkdir(parents=True)
    result = _invoke(out)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    text = _flat(result.output)
    assert f"error: --out: could not write '{out / 'goodput.png'}': Is a directory" in text
    assert f"Wrote {out / 'compare.json'}" in text and json.loads((out / "compare.json").read_text())["verdict"]
    assert _parts(out) == []


@pytest.mark.usefixtures("ran", "no_plot")
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names an open file through /proc")
def test_ctrl_c_while_compare_json_is_written_leaves_none_half_written(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    _fail_writing(monkeypatch, "compare.json", KeyboardInterrupt())
    result = _invoke(out)
    assert result.exit_code == 130, result.output
    assert "Traceback" not in result.output
    text = _flat(result.output)
    assert (f"interrupted: the report was cut short before compare.json was written; every deployment had already "
            f"stopped; kept: {out / 'colocated.json'}, {out / 'pd.json'}") in text
    assert not (out / "compare.json").exists() and _parts(out) == []


@pytest.mark.usefixtures("ran", "no_plot", "sigterm_fails_the_test")
def test_sigterm_while_the_report_is_printed_exits_130(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_table = compare_report.comparison_table

    def table(*args: Any) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)
        return real_table(*args)

    monkeypatch.setattr(compare_report, "comparison_table", table)
    out = tmp_path / "cmp"
    result = _invoke(out)
    assert result.exit_code == 130, result.output
    assert not isinstance(result.exception, Killed) and "Traceback" not in result.output
    assert "interrupted: the report was cut short before compare.json was written" in _flat(result.output)
    assert not (out / "compare.json").exists()
