"""The tokenizer's side files (tokenizer_config.json, generation_config.json, config.json's eos_token_id,
chat_template.jinja) are named when they are what is broken: before, any error in them was reported as
"tokenizer.json does not load", and 2.5 / "false" were silently read as 2 / true."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.checkpoint import open_tokenizer
from pdlaunch.model.demo_tokenizer import write_tokenizer_files
from tests.config.cli_helpers import check
from tests.helpers.checkpoints import make_llama


def _edit(path: Path, key: str, value: object) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[key] = value
    path.write_text(json.dumps(data))


@pytest.fixture()
def tok_dir(tmp_path: Path) -> Path:
    write_tokenizer_files(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", ["tokenizer_config.json", "generation_config.json", "config.json"])
def test_a_side_file_that_is_not_utf8_is_named(tok_dir: Path, name: str) -> None:
    (tok_dir / name).write_bytes(b"\xff\xfe\x00{}")
    with pytest.raises(PdlaunchError) as err:
        open_tokenizer(tok_dir)
    assert f"cannot read {tok_dir / name}" in err.value.message
    assert "tokenizer.json does not load" not in err.value.message


@pytest.mark.parametrize("name,key,value", [
    ("generation_config.json", "eos_token_id", "abc"),  # int("abc"): blamed on tokenizer.json
    ("generation_config.json", "eos_token_id", 2.5),  # was read as 2
    ("generation_config.json", "eos_token_id", [508, True]),
    ("config.json", "eos_token_id", "x"),
])
def test_a_token_id_that_is_not_an_integer_is_named_with_its_file(tok_dir: Path, name: str, key: str,
                                                                   value: object) -> None:
    _edit(tok_dir / name, key, value)
    with pytest.raises(PdlaunchError) as err:
        open_tokenizer(tok_dir)
    assert err.value.message.startswith(f"{name}:{key} ") and "is not a token id" in err.value.message


def test_token_ids_as_transformers_writes_them_still_load(tok_dir: Path) -> None:
    _edit(tok_dir / "generation_config.json", "eos_token_id", [508, "509", 510.0])
    assert open_tokenizer(tok_dir).eos_token_ids[:3] == [508, 509, 510]


@pytest.mark.parametrize("value", ["false", 1, "true"])
def test_add_bos_token_that_is_not_a_json_boolean_is_refused(tok_dir: Path, value: object) -> None:
    _edit(tok_dir / "tokenizer_config.json", "add_bos_token", value)  # bool("false") was True: an extra BOS
    with pytest.raises(PdlaunchError) as err:
        open_tokenizer(tok_dir)
    assert "tokenizer_config.json:add_bos_token" in err.value.message


def test_add_bos_token_null_is_false(tok_dir: Path) -> None:
    _edit(tok_dir / "tokenizer_config.json", "add_bos_token", None)
    assert open_tokenizer(tok_dir).add_bos_token is False


def test_a_chat_template_jinja_that_is_not_utf8_is_named(tok_dir: Path) -> None:
    (tok_dir / "chat_template.jinja").write_bytes(b"\xff{{ messages }}")  # was a UnicodeDecodeError
    with pytest.raises(PdlaunchError) as err:
        open_tokenizer(tok_dir)
    assert "chat_template.jinja" in err.value.message and "tokenizer.json" not in err.value.message


def test_check_config_names_the_broken_side_file(tmp_path: Path) -> None:
    model = make_llama(tmp_path / "llama")
    _edit(model / "tokenizer_config.json", "add_bos_token", "false")
    result = check([str(model), "--device", "cpu"])
    assert result.exit_code == 1 and "tokenizer_config.json:add_bos_token 'false'" in result.output, result.output
