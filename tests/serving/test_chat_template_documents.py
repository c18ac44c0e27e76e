"""The request's `documents` (vLLM's RAG field) reach the chat template's `documents` variable, and without them the
variable is null, not undefined, as transformers' apply_chat_template defines it: a template that tests
`documents is not none` or `documents is defined` renders the text transformers renders, and so the prompt
token ids vLLM sends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pdlaunch.http.errors import OpenAIError
from pdlaunch.model.demo_tokenizer import write_tokenizer_files
from pdlaunch.model.tokenizer import Tokenizer
from pdlaunch.server.chat_request import ChatCompletionRequest
from pdlaunch.server.chat_template import render

MESSAGES = [{"role": "user", "content": "What is the capital of Norway?"}]
DOCUMENTS = [{"title": "Norway", "text": "Oslo is the capital of Norway."},
             {"title": "Zürich <city>", "text": "Not a capital & 'quoted'."}]

TEMPLATES = [
    # Command R style: a grounded preamble only when there are documents
    "{{ bos_token }}{% if documents %}{% for d in documents %}[{{ loop.index0 }}] {{ d.title }}: {{ d.text }}\n"
    "{% endfor %}{% endif %}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}",
    "{% if documents is not none %}with documents{% else %}without documents{% endif %}",
    "{% if documents is defined %}defined{% else %}undefined{% endif %}|{{ tools is none }}",
    "{{ documents | tojson }}{{ eos_token }}",
    # Granite style
    "{%- if documents is defined and documents is not none %}{% for d in documents %}<doc>{{ d | tojson }}</doc>"
    "{% endfor %}{%- endif %}{{ messages[-1].content }}",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer_files(directory)
    return directory


@pytest.fixture
def tokenizer(files: Path) -> Tokenizer:
    return Tokenizer(files)


@pytest.fixture(scope="module")
def reference(files: Path) -> PreTrainedTokenizerBase:
    """The same tokenizer files loaded by transformers, whose apply_chat_template vLLM calls."""
    return AutoTokenizer.from_pretrained(files)


def ours(tokenizer: Tokenizer, template: str, **fields: Any) -> str:
    tokenizer.chat_template = template
    return render(tokenizer, ChatCompletionRequest.model_validate({"messages": MESSAGES, **fields}).template_messages())


def theirs(reference: PreTrainedTokenizerBase, template: str, documents: list[dict[str, str]] | None) -> str:
    text = reference.apply_chat_template(MESSAGES, chat_template=template, documents=documents, tokenize=False,
                                         add_generation_prompt=True)
    assert isinstance(text, str)
    return text


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("documents", [None, DOCUMENTS, []])
def test_documents_render_as_transformers_renders_them(tokenizer: Tokenizer, reference: PreTrainedTokenizerBase,
                                                       template: str, documents: list[dict[str, str]] | None) -> None:
    fields = {} if documents is None else {"documents": documents}
    assert ours(tokenizer, template, **fields) == theirs(reference, template, documents)


def test_documents_reach_the_template(tokenizer: Tokenizer) -> None:
    text = ours(tokenizer, TEMPLATES[0], documents=DOCUMENTS)
    assert "[0] Norway: Oslo is the capital of Norway.\n[1] Zürich <city>: Not a capital & 'quoted'.\n" in text
    assert ours(tokenizer, TEMPLATES[1]) == "without documents"


def test_chat_template_kwargs_may_give_the_documents_but_not_with_the_field(tokenizer: Tokenizer) -> None:
    """vLLM lets chat_template_kwargs set the template's documents; sent both ways it is ambiguous: a 400."""
    assert ours(tokenizer, TEMPLATES[1], chat_template_kwargs={"documents": DOCUMENTS}) == "with documents"
    with pytest.raises(OpenAIError) as info:
        ours(tokenizer, TEMPLATES[1], documents=DOCUMENTS, chat_template_kwargs={"documents": DOCUMENTS})
    assert info.value.status == 400 and info.value.param == "chat_template_kwargs.documents"


@pytest.mark.parametrize(("documents", "loc"), [
    ([{"title": "t", "text": 3}], ("documents", 0, "text")),  # vLLM's list[dict[str, str]]
    ({"title": "t"}, ("documents",)),
    (["just text"], ("documents", 0)),
])
def test_malformed_documents_are_refused_naming_the_field(documents: object, loc: tuple[object, ...]) -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"messages": MESSAGES, "documents": documents})
    assert info.value.errors()[0]["loc"] == loc


def test_documents_count_towards_the_prompts_size() -> None:
    """The size bound before tokenizing counts what the template may render, the documents too."""
    plain = ChatCompletionRequest.model_validate({"messages": MESSAGES}).template_messages().num_chars()
    with_documents = ChatCompletionRequest.model_validate(
        {"messages": MESSAGES, "documents": [{"text": "x" * 1000}]}).template_messages().num_chars()
    assert with_documents >= plain + 1000
