"""`bench compare` names its own flags in a deployment's config problems (the config paths it sets from them are
not what the user typed), says a --config file's problems are the file's, and bounds its timeouts as the proxy
does, before any deployment starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pdlaunch.bench.cli import bench_app

TINY_COMPARE = ["--model", "tiny", "--device", "cpu", "--input-len", "12", "--output-len", "4", "--max-model-len", "64",
                "--rates", "2"]


@pytest.mark.parametrize(("args", "file_text", "said"), [
    (["--config", "{file}"], "device: [unclosed\n", "error: --config: YAML syntax error in"),
    (["--config", "{file}"], "proxy:\n  workers: abc\n",
     "error: proxy.workers (in --config): must be auto or a whole number"),
    (["--colocated-instances", "1000000"], None, "error: --colocated-instances: 1000000 instances x TP 1"),
    (["--request-timeout", "inf"], None, "error: --request-timeout: inf is infinite; give a positive"),
    (["--request-timeout", "1e9"], None,
     "error: --request-timeout: 1000000000 must be at most 604770; give a positive number of seconds, e.g. 600"),
    (["--ready-timeout", "inf"], None, "error: --ready-timeout: inf is infinite; give a positive"),
])
def test_compare_names_the_flag_or_file_before_a_deployment(tmp_path: Path, args: list[str], file_text: str | None,
                                                           said: str) -> None:
    config = tmp_path / "base.yaml"
    if file_text is not None:
        config.write_text(file_text)
    result = CliRunner().invoke(bench_app, ["compare", *TINY_COMPARE, *[a.format(file=config) for a in args],
                                            "--out", str(tmp_path / "out")])
    text = " ".join(result.output.split())
    assert result.exit_code == 1, text
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert said in text, text
    assert "Traceback" not in text
    assert not (tmp_path / "out" / "colocated.json").exists()
