"""vLLM habits a new user brings (issue 33): flags pdlaunch does not take are refused saying why and
what it does instead, a hub id gets the download command, and `serve --help` reads at 80 columns."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from pdlaunch.cli import app
from tests.config.cli_helpers import check


def _one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize(("args", "said"), [
    (["--pipeline-parallel-size", "2"], "--pipeline-parallel-size: is not supported: pdlaunch has no pipeline "
                                        "parallelism; split a model over GPUs with --tp N"),
    (["-pp", "2"], "-pp: is not supported"),
    (["--enable-auto-tool-choice"], "--enable-auto-tool-choice: is not needed: pdlaunch always parses tool calls"),
    (["--tool-call-parser", "hermes"], "--tool-call-parser: is not needed: pdlaunch detects Hermes"),
    (["--trust-remote-code"], "--trust-remote-code: is not supported: pdlaunch runs its own"),
    (["--config", "vllm.yaml"], "--config: is vLLM's file of serve flags, which pdlaunch does not read; pass "
                                "pdlaunch's deployment YAML as the positional CONFIG.yaml"),
])
def test_vllm_flags_are_refused_with_why_and_what_instead(args: list[str], said: str) -> None:
    result = check(["--model", "tiny", *args])
    assert result.exit_code == 1
    text = _one_line(result.output)
    assert said in text and "No such option" not in text and "did you mean" not in text.lower(), text


def test_a_hub_id_gets_the_download_command() -> None:
    for args, flag in ((["meta-llama/Llama-3.1-8B"], "MODEL"), (["--model", "meta-llama/Llama-3.1-8B"], "--model")):
        text = _one_line(check(args).output)
        assert f"{flag}: " in text
        assert "huggingface-cli download meta-llama/Llama-3.1-8B --local-dir Llama-3.1-8B`, then pass " \
               "`Llama-3.1-8B`" in text, text


def test_no_enable_prefix_caching_turns_it_off() -> None:
    result = check(["--model", "tiny", "--no-enable-prefix-caching", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["config"]["cache"]["enable_prefix_caching"] is False


def test_serve_help_in_panels_with_defaults_at_80_columns() -> None:
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0
    text = result.output
    panels = re.findall(r"╭─ (.+?) ─", text)
    assert panels[:1] == ["Arguments"] and {"Model", "Devices and parallelism", "KV transfer", "KV cache",
                                             "Memory and scheduling", "Server", "Security"} <= set(panels), panels
    assert "Other" not in panels  # every flag has its panel
    assert all(len(line) <= 80 for line in text.splitlines())
    assert not re.search(r"--[a-z-]+…", text), "an option name is cut off"
    for default in ("[default: (16)]", "[default: (8000)]", "[default: (nixl)]", "[default: (logs)]"):
        assert default in text, default
    assert "--trust-remote-code" not in text  # refused spellings stay out of the help

