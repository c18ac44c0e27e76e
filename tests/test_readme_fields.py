"""README's "### Request fields" table: every request field vLLM's OpenAI server accepts for completions
and chat, each honoured (a field of our protocol models) or refused with a 400 (server/unsupported_fields.py),
then pdlaunch's own fields (extensions vLLM's requests lack).

The table is generated from those lists: `python -m tests.test_readme_fields` prints it. The test fails
when a vLLM field is neither modelled nor refused (it would be silently ignored), when a field is both,
or when README's table is not the one the code gives.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from pdlaunch.server.chat_request import ChatCompletionRequest
from pdlaunch.server.completion_request import CompletionRequest
from pdlaunch.server.structured_fields import _UNSUPPORTED_OPTIONS
from pdlaunch.server.unsupported_fields import _COMMON, _WHY, CHAT_ONLY, COMPLETION_ONLY

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "### Request fields"

_BOTH = ("completions", "chat")
# vLLM's CompletionRequest and ChatCompletionRequest (vllm/entrypoints/openai/completion/protocol.py and
# chat_completion/protocol.py as of 2026; vllm/entrypoints/openai/protocol.py before), in its order: the OpenAI
# fields, then vLLM's sampling and extra parameters. Fields older releases had (best_of and echo of chat, the guided_*
# names, structural_tag) stay: clients still send them. field -> the endpoints whose request has it.
VLLM_FIELDS: dict[str, tuple[str, ...]] = {
    "model": _BOTH,
    "prompt": ("completions",),
    "prompt_embeds": ("completions",),
    "suffix": ("completions",),
    "messages": ("chat",),
    "best_of": _BOTH,
    "echo": _BOTH,
    "frequency_penalty": _BOTH,
    "logit_bias": _BOTH,
    "logprobs": _BOTH,
    "top_logprobs": ("chat",),
    "max_tokens": _BOTH,
    "max_completion_tokens": ("chat",),
    "n": _BOTH,
    "presence_penalty": _BOTH,
    "response_format": _BOTH,
    "seed": _BOTH,
    "stop": _BOTH,
    "stream": _BOTH,
    "stream_options": _BOTH,
    "temperature": _BOTH,
    "top_p": _BOTH,
    "tools": ("chat",),
    "tool_choice": ("chat",),
    "reasoning_effort": ("chat",),
    "thinking_token_budget": _BOTH,
    "include_reasoning": ("chat",),
    "parallel_tool_calls": ("chat",),
    "user": _BOTH,
    "use_beam_search": _BOTH,
    "top_k": _BOTH,
    "min_p": _BOTH,
    "repetition_penalty": _BOTH,
    "watermarking": _BOTH,
    "length_penalty": _BOTH,
    "stop_token_ids": _BOTH,
    "include_stop_str_in_output": _BOTH,
    "ignore_eos": _BOTH,
    "min_tokens": _BOTH,
    "skip_special_tokens": _BOTH,
    "spaces_between_special_tokens": _BOTH,
    "truncate_prompt_tokens": _BOTH,
    "truncation_side": _BOTH,
    "prompt_logprobs": _BOTH,
    "logprob_token_ids": _BOTH,
    "allowed_token_ids": _BOTH,
    "bad_words": _BOTH,
    "add_generation_prompt": ("chat",),
    "continue_final_message": ("chat",),
    "add_special_tokens": _BOTH,
    "documents": ("chat",),
    "chat_template": ("chat",),
    "chat_template_kwargs": ("chat",),
    "media_io_kwargs": ("chat",),
    "mm_processor_kwargs": ("chat",),
    "guided_json": _BOTH,
    "guided_regex": _BOTH,
    "guided_choice": _BOTH,
    "guided_grammar": _BOTH,
    "structural_tag": ("chat",),
    "guided_decoding_backend": _BOTH,
    "guided_whitespace_pattern": _BOTH,
    "structured_outputs": _BOTH,
    "priority": _BOTH,
    "request_id": _BOTH,
    "session_id": _BOTH,
    "logits_processors": _BOTH,
    "return_tokens_as_token_ids": _BOTH,
    "return_token_ids": _BOTH,
    "routed_experts_prompt_start": _BOTH,
    "return_token_offsets": _BOTH,
    "return_prompt_text": ("chat",),
    "return_mm_kwargs": _BOTH,
    "cache_salt": _BOTH,
    "kv_transfer_params": _BOTH,
    "ec_transfer_params": _BOTH,
    "vllm_xargs": _BOTH,
    "repetition_detection": _BOTH,
    "stream_interval": _BOTH,
}
# Fields of our protocol models that vLLM's requests lack, after vLLM's in the table.
PDLAUNCH_FIELDS: dict[str, tuple[str, ...]] = {
    "seed_offset": _BOTH,
    "decode_limits": _BOTH,
}

# What an honoured field does not do (each is a 400 naming it), from the code where it has a list; a refused field's
# note is why it is refused (server/unsupported_fields.py _WHY), unless it has one here.
NOTES: dict[str, str] = {
    "prompt": "a list of prompts is a batch, colocated and through PD",
    "echo": "completions: with `logprobs` the prompt's logprobs lead; refused with 400 through PD and with stream",
    "prompt_logprobs": "refused with 400 with stream (vLLM refuses above 0, takes 0 and sends none); "
                       "through PD the prefill computes them; -1 (vLLM: the whole vocabulary) refused with 400, "
                       "0 to 20 taken",
    "logprobs": "-1 (vLLM: the whole vocabulary; chat's `top_logprobs` too) refused with 400, 0 to 20 taken",
    "stream_options": "`include_usage` defaults to false (as vLLM and OpenAI: `{}` asks for no usage chunk, and a "
                      "stream that did not ask for it carries no usage); a key sent as `null` is not sent; "
                      "`continuous_usage_stats: true` refused with 400; without `stream: true` a 400 unless empty or "
                      "null (as vLLM)",
    "response_format": "type `structural_tag` refused with 400; `json_schema.strict: true` keeps its schema closed "
                       "(see `strict` under Structured output)",
    "tools": "`function.strict: true` keeps a forced call's schema closed (see `strict` under "
             "Structured output)",
    "structured_outputs": ", ".join(f"`{o}`" for o in _UNSUPPORTED_OPTIONS) + " refused with 400; "
                          "`disable_additional_properties: false` opens the schema's objects, not those of a "
                          "`strict: true` schema or tool (see Strict JSON schemas)",
    "include_reasoning": "no reasoning parser runs here (as vLLM without `--reasoning-parser`): the answer is the "
                         "same at `true` (vLLM's default) and `false`",
    "request_id": "send the `X-Request-Id` header instead",
    "stream_interval": "a positive integer (else a 400, stream or not); no effect on a whole answer (as vLLM); above "
                       "1 refused with 400 on a stream: a stream here sends each engine step's tokens as they come",
    "session_id": "no effect on the answer (as `user`)",
    "skip_special_tokens": "chat with tools that may be called (`tool_choice` not `none`) on a checkpoint holding "
                           "`<tool_call>` / `</tool_call>` as special tokens: false whatever was sent, as vLLM's "
                           "hermes parser sets it (see Tool calling)",
    "spaces_between_special_tokens": "as vLLM with a fast tokenizer: `true` (the default) keeps the tokenizer's own "
                                     "joining, `false` (with `skip_special_tokens: false`) drops what it puts "
                                     "between two adjacent added tokens; byte-level BPE tokenizers (Llama 3, Qwen, "
                                     "the demo model) put nothing there, so the field changes nothing on them",
    "return_token_offsets": "as vLLM, read by its `/render` endpoints only: no effect on completions and chat",
    "return_mm_kwargs": "as vLLM, read by its `/render` endpoints only: no effect on completions and chat",
    "max_tokens": "as in vLLM: without it a completion gets 16 tokens and a chat answer may run to `max_model_len` "
                  "(a completion's `null` too)",
    "max_completion_tokens": "sets the limit when `max_tokens` is sent too; that `max_tokens` must still be valid "
                             "(a 400 naming it; vLLM drops it unread)",
    "guided_decoding_backend": "llguidance is the backend we run",
    "seed_offset": "pdlaunch's: draws of the seed's stream skipped before the first token (0 to "
                   "`max_model_len` + the prompt's tokens; a 400 when not 0 without `seed` or when greedy; each of "
                   "`n` samples skips them); request migration sets it",
    "decode_limits": "pdlaunch's: the PD proxy sets it on a prefill leg (`max_tokens`, `max_completion_tokens`, "
                     "`min_tokens` as the client sent them, and `kv_cache`: the KV cache of the decode chosen for it) "
                     "so that the prefill answers the 400 its decode leg would, before it computes the prompt; "
                     "refused with 400 on any other request (a client's own, at the proxy and at an instance)",
}

_MODELS = {"completions": CompletionRequest, "chat": ChatCompletionRequest}


def _refused(endpoint: str) -> dict[str, tuple[Any, ...]]:
    return {**_COMMON, **(CHAT_ONLY if endpoint == "chat" else COMPLETION_ONLY)}


def status(field: str, endpoint: str) -> str:
    """"honoured" or "refused with 400", or "-" where vLLM's request for `endpoint` has no such field."""
    if endpoint not in {**VLLM_FIELDS, **PDLAUNCH_FIELDS}[field]:
        return "-"
    refused = _refused(endpoint)
    if field in refused:
        neutral = ", ".join(dict.fromkeys(f"`{_json(v)}`" for v in refused[field]))
        return "refused with 400" + (f" (passes at {neutral})" if neutral else "")
    if field in _MODELS[endpoint].model_fields:
        return "honoured"
    return "IGNORED"  # neither modelled nor refused: the test below fails


def render_table() -> str:
    lines = ["| Field | Completions | Chat | Note |", "| --- | --- | --- | --- |"]
    for field in {**VLLM_FIELDS, **PDLAUNCH_FIELDS}:
        note = NOTES.get(field, _WHY.get(field, ""))
        lines.append(f"| `{field}` | {status(field, 'completions')} | {status(field, 'chat')} | {note} |")
    return "\n".join(lines)


def readme_table() -> str:
    text = README.read_text()
    start = text.index(HEADING)
    rows: list[str] = []
    for line in text[start:].splitlines()[1:]:
        if line.startswith("|"):
            rows.append(line)
        elif rows:  # the table ended
            break
    return "\n".join(rows)


def _json(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).replace("'", '"').replace("()", "[]")


@pytest.mark.parametrize("field", list(VLLM_FIELDS))
def test_every_vllm_field_is_honoured_or_refused(field: str) -> None:
    for endpoint in VLLM_FIELDS[field]:
        modelled, refused = field in _MODELS[endpoint].model_fields, field in _refused(endpoint)
        assert modelled != refused, f"{field} ({endpoint}): modelled={modelled}, refused={refused}"


def test_the_list_knows_vllms_2026_fields() -> None:
    """The list predated vLLM 2026's request models (its new fields were ignored, with only a log line, unchecked)
    and said completions had no bad_words."""
    newer = {"logprob_token_ids", "thinking_token_budget", "repetition_detection", "watermarking",
             "truncation_side", "stream_interval", "session_id", "routed_experts_prompt_start", "return_token_offsets",
             "return_mm_kwargs", "ec_transfer_params", "media_io_kwargs", "return_prompt_text"}
    assert newer <= set(VLLM_FIELDS), sorted(newer - set(VLLM_FIELDS))
    assert "completions" in VLLM_FIELDS["bad_words"]  # vLLM's CompletionRequest has had bad_words


@pytest.mark.parametrize("endpoint", list(_MODELS))
def test_every_modelled_field_is_in_the_table(endpoint: str) -> None:
    """A field of our own (not vLLM's) is listed too, where the models have it."""
    for field, endpoints in PDLAUNCH_FIELDS.items():
        assert field not in VLLM_FIELDS and (field in _MODELS[endpoint].model_fields) == (endpoint in endpoints)
    unlisted = set(_MODELS[endpoint].model_fields) - set(VLLM_FIELDS) - set(PDLAUNCH_FIELDS)
    assert not unlisted, f"add {sorted(unlisted)} to PDLAUNCH_FIELDS (and the README table)"


def test_readme_table_is_the_one_the_code_gives() -> None:
    assert HEADING in README.read_text(), f"README.md has no {HEADING!r} subsection"
    table = readme_table()
    assert [re.match(r"\| `([a-z_]+)`", row).group(1) for row in table.splitlines()[2:]] == \
        [*VLLM_FIELDS, *PDLAUNCH_FIELDS]
    assert table == render_table(), "regenerate with: python -m tests.test_readme_fields"


if __name__ == "__main__":
    print(render_table())
