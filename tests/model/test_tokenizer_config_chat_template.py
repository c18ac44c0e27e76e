"""tokenizer_config.json's chat_template in a shape transformers does not read (a number, an object of something
other than template text, a list entry without name and template) is an error naming the file and the field.
Before, it was dropped without a word and every chat request later failed with "this checkpoint has no chat
template"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.checkpoint import open_tokenizer
from pdlaunch.model.demo_tokenizer import write_tokenizer_files
from tests.config.cli_helpers import check
from tests.helpers.checkpoints import make_llama

PLAIN = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
TOOLS = "{{ tools }}{% for m in messages %}{{ m['content'] }}{% endfor %}"


def _set_template(directory: Path, value: object) -> None:
    path = directory / "tokenizer_config.json"
    data = json.loads(path.read_text())
    data["chat_template"] = value
    path.write_text(json.dumps(data))


@pytest.fixture()
def tok_dir(tmp_path: Path) -> Path:
    write_tokenizer_files(tmp_path)
    return tmp_path


@pytest.mark.parametrize("value,what", [
    (5, "chat_template 5 is neither template text nor a list of named templates"),
    (True, "chat_template true is neither"),
    ({"default": 5}, 'chat_template {"default": 5} maps a name to something other than template text'),
    ([], "chat_template lists no template"),
    ({}, "chat_template lists no template"),
    ([PLAIN], "chat_template entry 0, "),
    ([{"name": "default", "template": PLAIN}, {"name": "tool_use"}], 'entry 1, {"name": "tool_use"}, is not'),
    ([{"template": PLAIN}], "entry 0, "),
])
def test_a_chat_template_of_the_wrong_shape_names_the_file_and_field(tok_dir: Path, value: object,
                                                                      what: str) -> None:
    _set_template(tok_dir, value)
    with pytest.raises(PdlaunchError) as err:
        open_tokenizer(tok_dir)
    assert err.value.message.startswith(f"{tok_dir / 'tokenizer_config.json'}: chat_template")
    assert what in err.value.message
    assert err.value.hint is not None and '[{"name": "default", "template": "..."}]' in err.value.hint


@pytest.mark.parametrize("value,expected", [
    (PLAIN, PLAIN),
    (None, None),
    ([{"name": "tool_use", "template": TOOLS}, {"name": "default", "template": PLAIN}], PLAIN),
    ([{"name": "rag", "template": TOOLS}], TOOLS),  # no "default": the first
    ({"tool_use": TOOLS, "default": PLAIN}, PLAIN),  # the in-memory form transformers also reads from the file
])
def test_the_shapes_transformers_reads_still_load(tok_dir: Path, value: object, expected: str | None) -> None:
    _set_template(tok_dir, value)
    assert open_tokenizer(tok_dir).chat_template == expected


def test_chat_template_jinja_is_read_instead_of_a_bad_field(tok_dir: Path) -> None:
    _set_template(tok_dir, 5)
    (tok_dir / "chat_template.jinja").write_text(PLAIN)
    assert open_tokenizer(tok_dir).chat_template == PLAIN


def test_check_config_says_it_before_serving(tmp_path: Path) -> None:
    model = make_llama(tmp_path / "llama")
    _set_template(model, {"default": {"text": PLAIN}})
    result = check([str(model), "--device", "cpu"])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "tokenizer_config.json: chat_template" in text, result.output
