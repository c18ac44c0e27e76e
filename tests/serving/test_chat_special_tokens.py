"""A chat prompt's token ids are vLLM's: its chat endpoint renders the template and encodes the text without adding
special tokens (`add_special_tokens` default false), as transformers' apply_chat_template(tokenize=True) does, so
a template that renders no BOS gets none, one that renders it gets it once; `add_special_tokens: true` adds the
tokenizer's own. Templates see every special token the tokenizer sets (pad_token too), as transformers passes."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pdlaunch.model.demo_tokenizer import BOS_TOKEN_ID, write_tokenizer_files
from pdlaunch.model.tokenizer import Tokenizer
from pdlaunch.server.chat_request import ChatCompletionRequest
from pdlaunch.server.chat_template import render
from pdlaunch.server.prompts import tokenize
from pdlaunch.server.tokenize import TokenizeChatRequest

MESSAGES = [{"role": "user", "content": "What is the capital of Norway?"}]
NO_BOS = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}<|assistant|>\n"
WITH_BOS = "{{ bos_token }}" + NO_BOS


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer_files(directory)  # add_bos_token: true, a template that renders no BOS
    return directory


@pytest.fixture(scope="module")
def reference(files: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(files)


def chat_ids(files: Path, template: str, **fields: object) -> list[int]:
    tokenizer = Tokenizer(files)
    tokenizer.chat_template = template
    return tokenize(tokenizer, ChatCompletionRequest.model_validate({"messages": MESSAGES, **fields})
                    .template_messages())


@pytest.mark.parametrize("template", [NO_BOS, WITH_BOS])
def test_chat_prompt_ids_are_transformers_and_vllms(files: Path, reference: PreTrainedTokenizerBase,
                                                    template: str) -> None:
    theirs = reference.apply_chat_template(MESSAGES, chat_template=template, tokenize=True,
                                           add_generation_prompt=True, return_dict=False)
    ours = chat_ids(files, template)
    assert ours == list(theirs)
    assert ours.count(BOS_TOKEN_ID) == (1 if template == WITH_BOS else 0)


def test_add_special_tokens_true_adds_one_bos(files: Path) -> None:
    assert chat_ids(files, NO_BOS, add_special_tokens=True)[0] == BOS_TOKEN_ID
    assert chat_ids(files, WITH_BOS, add_special_tokens=True).count(BOS_TOKEN_ID) == 1


def test_tokenize_messages_encodes_as_chat(files: Path) -> None:
    tokenizer = Tokenizer(files)
    tokenizer.chat_template = NO_BOS
    body = TokenizeChatRequest.model_validate({"messages": MESSAGES})
    assert tokenize(tokenizer, body.chat_prompt()) == chat_ids(files, NO_BOS)


def test_templates_see_every_special_token_the_tokenizer_sets(files: Path, reference: PreTrainedTokenizerBase) -> None:
    template = "[{{ pad_token }}][{{ unk_token is defined }}][{{ bos_token }}][{{ eos_token }}]"
    tokenizer = Tokenizer(files)
    tokenizer.chat_template = template
    ours = render(tokenizer, ChatCompletionRequest.model_validate({"messages": MESSAGES}).template_messages())
    assert ours == reference.apply_chat_template(MESSAGES, chat_template=template, tokenize=False)
