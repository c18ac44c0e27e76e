"""Tokenizer of a checkpoint directory: tokenizer.json via `tokenizers`, chat template via jinja2.

Reads tokenizer_config.json (bos/eos, add_bos_token, chat_template), chat_template.jinja (newer
HF saves the template there) and generation_config.json (extra EOS ids). No hub access.

The chat template is compiled once per template text and reused by every request (compiling is what costs:
1-2 ms for the demo model's template, ~7 ms for Llama 3's on a 2-core CPU, against ~10 us to render a short chat).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from jinja2 import Template, TemplateError
from pydantic import JsonValue
from tokenizers import Tokenizer as HFTokenizer

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.chat_template_file import chat_template_text
from pdlaunch.model.template_environment import template_environment


def _read_json(path: Path) -> dict[str, JsonValue]:
    if not path.is_file():
        return {}
    try:
        data: JsonValue = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8, or not JSON
        raise PdlaunchError(f"cannot read {path}: {exc}", field="model.path",
                            hint=f"restore the checkpoint's {path.name}") from exc
    except RecursionError:  # arrays or objects nested past Python's stack
        raise PdlaunchError(f"cannot read {path}: its JSON nests too deeply", field="model.path",
                            hint=f"restore the checkpoint's {path.name}") from None
    if not isinstance(data, dict):
        raise PdlaunchError(f"{path} holds a JSON {type(data).__name__}, not an object", field="model.path")
    return data


# Besides bos_token and eos_token (always set, "" when the tokenizer has none), the special tokens a chat template
# sees when the tokenizer sets them, as transformers' special_tokens_map gives them.
TEMPLATE_SPECIAL_TOKENS = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value: JsonValue) -> str | None:
    """tokenizer_config stores special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _token_id(value: JsonValue, where: str) -> int:
    """A token id as `where` (file:key) gives it: an integer, or its digits in a string (as transformers reads
    it); 2.5, "abc" or true are refused naming `where` rather than truncated or blamed on tokenizer.json."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise PdlaunchError(f"{where} {value!r} is not a token id", field="model.path",
                        hint="a token id is an integer: restore the checkpoint's file")


def _as_id_list(value: JsonValue, where: str) -> list[int]:
    if value is None:
        return []
    return [_token_id(v, where) for v in value] if isinstance(value, list) else [_token_id(value, where)]


def _configured_template(value: JsonValue, path: Path) -> str | None:
    """tokenizer_config.json's chat_template: the template text, or named templates ("default", else the first) as
    transformers saves them, [{"name": ..., "template": ...}], or as it also reads them, {name: template}. Every
    other value is an error naming the file: ignored, it became "this checkpoint has no chat template" later."""
    if value is None or isinstance(value, str):
        return value
    named: dict[str, str] = {}
    entries = value if isinstance(value, list) else []
    for i, entry in enumerate(entries):
        name, text = (entry.get("name"), entry.get("template")) if isinstance(entry, dict) else (None, None)
        if not isinstance(name, str) or not isinstance(text, str):
            raise _bad_template(path, f"entry {i}, {_shown(entry)}, is not {{\"name\": ..., \"template\": ...}}")
        named[name] = text
    if isinstance(value, dict):
        named = {name: text for name, text in value.items() if isinstance(text, str)}
        if len(named) != len(value):
            raise _bad_template(path, f"{_shown(value)} maps a name to something other than template text")
    elif not isinstance(value, list):
        raise _bad_template(path, f"{_shown(value)} is neither template text nor a list of named templates")
    if not named:
        raise _bad_template(path, "lists no template")
    return named.get("default", next(iter(named.values())))


def _shown(value: JsonValue) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _bad_template(path: Path, what: str) -> PdlaunchError:
    return PdlaunchError(f"{path}: chat_template {what}", field="model.path",
                         hint='write it as the Jinja template text, or as [{"name": "default", "template": "..."}]; '
                         "or put the template in chat_template.jinja beside it, which is read instead")


TOOL_CALL_MARKERS = ("<tool_call>", "</tool_call>")  # the hermes-style tool call's markers


class Tokenizer:
    """Encode/decode and chat formatting for one checkpoint."""

    def __init__(self, directory: Path) -> None:
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise PdlaunchError(
                f"{path} is missing",
                field="model.path",
                hint="pdlaunch needs a fast-tokenizer tokenizer.json in the checkpoint directory",
            )
        self._tok = HFTokenizer.from_file(str(path))
        self._added: frozenset[int] | None = None
        self._compiled: tuple[str, Template] | None = None  # (template text, its compiled template)
        config = _read_json(directory / "tokenizer_config.json")
        gen_config = _read_json(directory / "generation_config.json")
        model_config = _read_json(directory / "config.json")

        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        # the other special tokens transformers' apply_chat_template gives a template (those the tokenizer sets)
        self.template_special_tokens: dict[str, str] = {
            name: text for name in TEMPLATE_SPECIAL_TOKENS if (text := _token_text(config.get(name))) is not None}
        self.bos_token_id: int | None = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        if self.bos_token_id is None and gen_config.get("bos_token_id") is not None:
            self.bos_token_id = _token_id(gen_config["bos_token_id"], "generation_config.json:bos_token_id")
        add_bos = config.get("add_bos_token") or False
        if not isinstance(add_bos, bool):  # bool("false") would be True: a BOS the model was not trained with
            raise PdlaunchError(f"tokenizer_config.json:add_bos_token {add_bos!r} is not true or false",
                                field="model.path", hint="write it as a JSON boolean, without quotes")
        self.add_bos_token = add_bos

        eos: list[int] = []
        eos_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        if eos_id is not None:
            eos.append(eos_id)
        for where, source in (("generation_config.json", gen_config), ("config.json", model_config)):
            eos.extend(_as_id_list(source.get("eos_token_id"), f"{where}:eos_token_id"))
        self.eos_token_ids: list[int] = list(dict.fromkeys(eos))
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        # `<tool_call>` or `</tool_call>` held as a special added token (Hermes 2 Pro / Hermes 3 on Llama 3): decoding
        # that skips special tokens strips them, so tool calling decodes with them (server/choices.py)
        self.special_tool_call_markers: bool = any(token.special and token.content in TOOL_CALL_MARKERS
                                                   for token in self._tok.get_added_tokens_decoder().values())
        self.chat_template: str | None = self._load_chat_template(directory, config)

    @staticmethod
    def _load_chat_template(directory: Path, config: dict[str, JsonValue]) -> str | None:
        jinja_file = directory / "chat_template.jinja"
        if jinja_file.is_file():
            try:
                return jinja_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise PdlaunchError(f"cannot read {jinja_file}: {exc}", field="model.path",
                                    hint="restore the checkpoint's chat_template.jinja (UTF-8 text)") from None
        return _configured_template(config.get("chat_template"), directory / "tokenizer_config.json")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with special tokens, exactly one BOS when the tokenizer uses one."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # `tokenizers` would raise a bare TypeError
            raise PdlaunchError(f"the text holds a lone UTF-16 surrogate at character {exc.start}",
                                field="prompt", hint="send valid Unicode") from None
        ids = self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids  # encode holds the GIL
        bos = self.bos_token_id
        if not add_special_tokens or bos is None:
            return ids
        if self.add_bos_token and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        # A chat template that renders the BOS text itself would otherwise get a second one.
        if len(ids) >= 2 and ids[0] == bos and ids[1] == bos and self.bos_token and text.startswith(self.bos_token):
            ids = ids[1:]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True,
               spaces_between_special_tokens: bool = True) -> str:
        """The text of `ids`, as vLLM v1 decodes with a fast tokenizer (its FastIncrementalDetokenizer): the
        tokenizer's own joining, unless special tokens are kept and `spaces_between_special_tokens` is False: then an
        added token right after another added token is its own text, without what the joining puts in front of it
        (a space with WordPiece's decoder; byte-level BPE puts nothing there)."""
        ids = list(ids)
        if skip_special_tokens or spaces_between_special_tokens:
            return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        added = self._added_tokens()
        cuts = [i for i in range(1, len(ids)) if ids[i] in added and ids[i - 1] in added]
        if not cuts:
            return self._tok.decode(ids, skip_special_tokens=False)
        # each run starts at such a token, which a run's decoding gives as its own text (nothing before it)
        bounds = [0, *cuts, len(ids)]
        return "".join(self._tok.decode(ids[a:b], skip_special_tokens=False) for a, b in zip(bounds, bounds[1:]))

    def _added_tokens(self) -> frozenset[int]:
        """The ids of the tokenizer's added tokens, special or not (vLLM's added_token_ids)."""
        if self._added is None:
            self._added = frozenset(self._tok.get_added_tokens_decoder())
        return self._added

    def to_json(self) -> str:
        """The tokenizer.json text (what grammar libraries build their token tables from)."""
        return str(self._tok.to_str())

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def override_chat_template(self, value: str) -> None:
        """Use `value` (a file path, or the template text itself) instead of the checkpoint's template."""
        value = chat_template_text(value)
        try:
            compiled = template_environment().from_string(value)
        except TemplateError as exc:
            raise PdlaunchError(f"chat template does not compile: {exc}", field="model.chat_template") from None
        self.chat_template = value
        self._compiled = (value, compiled)

    def _compiled_template(self, text: str) -> Template:
        """`text` (the chat template) compiled, once per text: `chat_template` may be replaced at any time. A Jinja
        template renders from many threads at once (each render has its own context)."""
        cached = self._compiled
        if cached is None or (cached[0] is not text and cached[0] != text):
            cached = self._compiled = (text, template_environment().from_string(text))
        return cached[1]

    def apply_chat_template(self, messages: Sequence[Mapping[str, object]], add_generation_prompt: bool = True,
                            tools: Sequence[Mapping[str, object]] | None = None,
                            extra: Mapping[str, object] | None = None) -> str:
        """Render `messages` ([{"role", "content"}, ...]) with the chat template; `tools` (OpenAI tool
        definitions) and `extra` (chat_template_kwargs) become template variables too."""
        if not self.chat_template:
            raise PdlaunchError(
                "this checkpoint has no chat template",
                field="model.path",
                hint="add `chat_template` to tokenizer_config.json (or chat_template.jinja), "
                "or use /v1/completions with a plain prompt",
            )
        try:
            return self._compiled_template(self.chat_template).render(
                **{**self.template_special_tokens, **(extra or {})},  # chat_template_kwargs may replace them
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as exc:
            raise PdlaunchError(f"chat template failed: {exc}", field="messages") from exc
