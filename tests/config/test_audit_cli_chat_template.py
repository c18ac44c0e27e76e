"""--chat-template / model.chat_template: check-config refuses what every instance would refuse at start (a file
that is not there, a directory, a file that is not UTF-8, a template that does not parse), so serve fails
before it starts a process instead of each instance exiting once its weights are loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdlaunch.config.rules.chat_template import chat_template_problems
from pdlaunch.errors import PdlaunchError
from pdlaunch.model.tokenizer import Tokenizer
from tests.config.cli_helpers import assert_invalid, check, invoke, write_model, write_yaml

CPU = ["--model", "tiny", "--device", "cpu"]
GOOD = "{% for m in messages %}{{ m.content }}{% endfor %}"


def _values(root: Path) -> dict[str, tuple[str, str | None]]:
    """name -> (value, what check-config says about it; None: valid)."""
    (root / "good.jinja").write_text(GOOD)
    (root / "broken.jinja").write_text("{% for m in messages %}{{ m.content }\n")
    (root / "latin1.jinja").write_bytes(b"{{ 'caf\xe9' }}")
    (root / "templates").mkdir()
    return {
        "missing file": (str(root / "chat.jinja"), "is neither an existing file nor a Jinja2 template"),
        "directory": (str(root / "templates"), "is a directory"),
        "file that does not parse": (str(root / "broken.jinja"), "does not parse"),
        "inline text that does not parse": ("{% for m in messages %}", "does not parse"),
        "file not UTF-8": (str(root / "latin1.jinja"), "cannot read the chat template file"),
        "file": (str(root / "good.jinja"), None),
        "inline text": (GOOD, None),
    }


@pytest.mark.parametrize("name", ["missing file", "directory", "file that does not parse",
                                  "inline text that does not parse", "file not UTF-8"])
def test_check_config_refuses_what_the_instances_refuse(name: str, tmp_path: Path) -> None:
    value, text = _values(tmp_path)[name]
    assert_invalid(check([*CPU, "--chat-template", value]), "--chat-template", text)
    path = write_yaml(tmp_path, f"model:\n  path: tiny\n  chat_template: {value!r}\n")
    assert_invalid(check([str(path), "--device", "cpu"]), "model.chat_template", text)


@pytest.mark.parametrize("name", ["file", "inline text"])
def test_check_config_takes_a_file_or_the_template_itself(name: str, tmp_path: Path) -> None:
    value, _ = _values(tmp_path)[name]
    result = check([*CPU, "--chat-template", value])
    assert result.exit_code == 0, result.output


def test_serve_refuses_a_missing_template_file_before_starting_anything(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    served = invoke(["serve", *CPU, "--colocated", "--chat-template", str(tmp_path / "chat.jinja"),
                     "--log-dir", str(logs)])
    assert served.exit_code == 1, served.output
    assert "error: --chat-template:" in served.output and "exited" not in served.output, served.output
    assert not logs.exists()  # no instance was started


def test_check_config_and_the_instance_tokenizer_agree(tmp_path: Path) -> None:
    tokenizer = Tokenizer(write_model(tmp_path))
    for name, (value, text) in _values(tmp_path).items():
        try:
            tokenizer.override_chat_template(value)
            refused = False
        except PdlaunchError:
            refused = True
        assert refused == bool(chat_template_problems(value)) == (text is not None), name


def test_a_long_inline_template_is_taken_by_the_instances(tmp_path: Path) -> None:
    long_template = GOOD + "{# " + "a real chat template is longer than a file name may be " * 5 + "#}"
    assert chat_template_problems(long_template) == []
    tokenizer = Tokenizer(write_model(tmp_path))
    tokenizer.override_chat_template(long_template)  # raised ENAMETOOLONG: Path(text).is_file() past 255 bytes
    assert tokenizer.chat_template == long_template
