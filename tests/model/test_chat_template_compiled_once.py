"""A tokenizer compiles its chat template once, not per request: compiling cost every chat request 1-2 ms (the demo
model's template) to ~7 ms (Llama 3's) before its prompt reached the engine, where rendering a short chat takes
~10 us. A template replaced later (`chat_template` set, or override_chat_template) is the one rendered."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdlaunch.model import tokenizer as tokenizer_module
from pdlaunch.model.demo_tokenizer import write_tokenizer_files
from pdlaunch.model.template_environment import template_environment
from pdlaunch.model.tokenizer import Tokenizer

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture()
def compiles(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The template texts the tokenizer module compiles."""
    seen: list[str] = []

    class Counting:
        def from_string(self, source: str) -> object:
            seen.append(source)
            return template_environment().from_string(source)

    monkeypatch.setattr(tokenizer_module, "template_environment", Counting)
    return seen


@pytest.fixture()
def tokenizer(tmp_path: Path) -> Tokenizer:
    write_tokenizer_files(tmp_path)
    return Tokenizer(tmp_path)


def test_the_template_compiles_once_for_every_request(tokenizer: Tokenizer, compiles: list[str]) -> None:
    first = tokenizer.apply_chat_template(MESSAGES)
    for _ in range(5):
        assert tokenizer.apply_chat_template(MESSAGES) == first
    assert compiles == [tokenizer.chat_template]


def test_a_template_set_later_is_the_one_rendered(tokenizer: Tokenizer, compiles: list[str]) -> None:
    tokenizer.apply_chat_template(MESSAGES)
    tokenizer.chat_template = "{% for m in messages %}[{{ m.content }}]{% endfor %}"
    assert tokenizer.apply_chat_template(MESSAGES) == "[hi]"
    assert tokenizer.apply_chat_template(MESSAGES) == "[hi]"
    tokenizer.override_chat_template("{% for m in messages %}<{{ m.content }}>{% endfor %}")
    assert tokenizer.apply_chat_template(MESSAGES) == "<hi>"
    assert len(compiles) == 3  # the checkpoint's, the one set, the override's (compiled once to check it)
