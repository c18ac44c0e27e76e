"""Structured output with llguidance: a grammar per request, token masks applied in the sampler.

Why llguidance (over xgrammar): measured on this project's CPU host with SmolLM2's 49k vocabulary
and a JSON schema, a step of 64 constrained rows (fill the masks, apply them, advance the
matchers) took 2.8 ms p50 with llguidance and 11.6 ms with xgrammar (benchmarks/RESULTS.md), and
llguidance needs no other package (xgrammar pulls transformers, triton and tvm-ffi).

A request's `StructuredOutput` (kind + value, from response_format, structured_outputs or the
guided_* fields) becomes an llguidance grammar; `check` compiles it without a tokenizer on the
HTTP side and runs its first steps over single bytes, where a grammar too large for llguidance's
limits fails (400 naming the request field; engine/grammar_limits.py). The engine makes one `LLMatcher` per request
(`GrammarBackend.matcher`); each step the sampler fills the constrained rows of one int32 bitmask
[N, ceil(V / 32)] and applies it to the logits (everything else of the batch passes: all bits
set), and the output processor advances the matcher with the sampled token. When the grammar is
complete only EOS stays allowed: the request samples it and stops there, the EOS counted as an output
token (vLLM's; engine/output_processor.py).

PD: the prefill leg samples its one token under the same grammar (the leg carries the request's
structured-output fields). A decode that continues from that token (engine/first_token.py) takes
it through OutputProcessor.append_token like a token sampled here, which advances its matcher
from the prompt state; a decode that recomputes the last prompt token samples the first token
under its own fresh matcher. Either way both legs' grammar state starts at the prompt and agrees.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, JsonValue

from pdlaunch.engine.grammar_limits import is_limit_error, probe
from pdlaunch.errors import EngineError

if TYPE_CHECKING:  # llguidance is imported where a grammar is first needed; torch where masks are (the proxy
    # reads these request models and needs no torch)
    import torch
    from llguidance import LLMatcher, LLTokenizer

    from pdlaunch.model.tokenizer import Tokenizer

Kind = Literal["json", "json_object", "regex", "choice", "grammar"]
TOKENIZER_BUILD_TIMEOUT_S = 120.0
_FORMATS: dict[str, Literal["regex", "choice", "grammar"]] = {"regex": "regex", "choice": "choice",
                                                              "grammar": "grammar"}


class StructuredOutput(BaseModel):
    """What the output must match. `field`: the request field it came from (for errors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Kind
    value: str  # JSON schema text, regex, JSON list of choices, or Lark / GBNF grammar
    field: str = "structured_outputs"
    # JSON without free whitespace between tokens unless asked (structured_outputs
    # disable_any_whitespace: false): small models otherwise emit whitespace until max_tokens.
    any_whitespace: bool = False
    # Object schemas that declare `properties` and say nothing of `additionalProperties` are closed
    # (close_objects) unless asked (structured_outputs disable_additional_properties: false).
    open_objects: bool = False

    def grammar(self) -> str:
        import llguidance

        if self.kind in ("json", "json_object"):
            text = '{"type": "object"}' if self.kind == "json_object" else self.value
            if self.kind == "json" and not self.open_objects:
                text = json.dumps(close_objects(json.loads(text)))
            return str(llguidance.LLMatcher.grammar_from_json_schema(
                text, defaults={"whitespace_flexible": self.any_whitespace}))
        return str(llguidance.grammar_from(_FORMATS[self.kind], self.value))


# Keywords whose value is one subschema, a list of them, or a map of name -> subschema (JSON Schema 2020-12
# and draft 7's `definitions`); `const`, `enum`, `default` and `examples` hold values, never schemas.
_ONE_SCHEMA = ("additionalProperties", "items", "not", "if", "then", "else", "contains", "propertyNames",
               "unevaluatedProperties", "unevaluatedItems", "additionalItems")
_ITEM_LISTS = ("prefixItems", "items")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_UNIONS = ("anyOf", "oneOf")


def close_objects(schema: JsonValue, close_self: bool = True, beside: Sequence[str] = (),
                  members_close: bool | None = None) -> JsonValue:
    """`schema` with `"additionalProperties": false` on every object schema that declares `properties` and
    leaves `additionalProperties` out: the keys it names are all it may have, as with xgrammar's default and
    OpenAI's strict mode (a model otherwise invents keys until max_tokens). An explicit
    `additionalProperties` (true, or a schema) is kept, and `{"type": "object"}` without `properties` stays
    any object, and so do the members of an `allOf` themselves (each names only part of the keys) and an object
    with `unevaluatedProperties`. A schema that is not an object (a bare true/false) comes back unchanged.

    Beside an object's own `properties` (or allOf), its anyOf / oneOf members are parts of the same object (a
    discriminated union): `additionalProperties` sees only the `properties` next to it, so closed alone the
    object forbade its members' keys and the member its object's (a valid schema refused as unsatisfiable).
    Such an object is closed to its keys and every member's, and each member to its own and the object's
    (`beside`: named `{}` there, the object constrains them); a member whose keys cannot be listed (a `$ref`)
    leaves them open. A union that is a whole allOf member, or a whole member of such a union, is part of the same
    object too: its members close only where that object's would (`members_close`, default `close_self`), to their
    keys and the rest of the object's; closed on their own they forbade the keys beside them."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _ONE_SCHEMA:
        one = out.get(key)
        if isinstance(one, dict):
            out[key] = close_objects(one)
    for key in _ITEM_LISTS:
        many = out.get(key)
        if isinstance(many, list):
            out[key] = [close_objects(item) for item in many]
    for key in _SCHEMA_MAPS:
        named = out.get(key)
        if isinstance(named, dict):
            out[key] = {name: close_objects(sub) for name, sub in named.items()}
    properties = out.get("properties")
    own: list[str] = list(properties) if isinstance(properties, dict) else []
    shared, alternatives = _member_keys(schema, ("allOf",)), _member_keys(schema, _UNIONS)
    listed = (shared is not None and alternatives is not None
              and not {"additionalProperties", "unevaluatedProperties"} & set(out))
    closes = close_self and bool(own) and listed
    parts = out.get("allOf")
    if isinstance(parts, list):
        # a member is never closed itself; a union in it closes as this object's would, to the keys beside it
        out["allOf"] = [close_objects(item, False, [*beside, *own, *(alternatives or ()),
                                                    *(_member_keys({"allOf": parts[:i] + parts[i + 1:]}, ("allOf",))
                                                      or ())], close_self and listed)
                        for i, item in enumerate(parts)]
    whole = not own and "allOf" not in out  # its union's members are whole alternatives, each closed on its own
    whole_close = close_self if members_close is None else members_close
    for key in _UNIONS:
        many = out.get(key)
        if isinstance(many, list):
            out[key] = [close_objects(item, whole_close, beside) if whole else
                        close_objects(item, closes, [*beside, *own, *(shared or ())]) for item in many]
    if closes and isinstance(properties, dict):
        extra = [key for key in (*beside, *(shared or ()), *(alternatives or ())) if key not in own]
        out["properties"] = {**properties, **{key: {} for key in extra}}
        out["additionalProperties"] = False
    return out


def _member_keys(schema: dict[str, JsonValue], compositions: Sequence[str]) -> list[str] | None:
    """The keys the members of `schema`'s `compositions` name (their own members' too), or None when a member's
    cannot be listed: a `$ref`, `patternProperties`, or an `additionalProperties` other than false."""
    keys: list[str] = []
    for key in compositions:
        members = schema.get(key)
        for member in members if isinstance(members, list) else ():
            if not isinstance(member, dict):
                continue  # true / false: names no key
            if "$ref" in member or "patternProperties" in member or member.get("additionalProperties", False) \
                    is not False:
                return None
            named = member.get("properties")
            nested = _member_keys(member, ("allOf", *_UNIONS))
            if nested is None:
                return None
            keys.extend([*(named if isinstance(named, dict) else ()), *nested])
    return keys


def check(spec: StructuredOutput) -> str:
    """The grammar of `spec`, compiled once to find errors, and its first steps run to find the llguidance limits it
    exceeds (engine/grammar_limits.py); ValueError naming what is wrong."""
    import llguidance

    try:
        grammar = spec.grammar()
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"{spec.field}: {exc}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise ValueError(f"{spec.field}: {error.strip()}")
    stuck = probe(grammar)
    if stuck is not None:
        what = "too large: it runs past llguidance's limits" if is_limit_error(stuck) else "cannot be followed"
        raise ValueError(f"{spec.field}: the grammar is {what} in its first output bytes ({stuck}); use a smaller "
                         "pattern, schema or choice list")
    return grammar


class GrammarBackend:
    """llguidance over one engine's tokenizer. Its token table takes 0.3-1 s to build for a 50k
    vocabulary, so a daemon thread builds it when the engine starts (`warm`): the first
    structured-output request does not stall every other request's step."""

    def __init__(self, tokenizer_json: Callable[[], str], vocab_size: int, eos_token_id: int | None,
                 warm: bool = True) -> None:
        self._tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self._eos = eos_token_id
        self._tokenizer: LLTokenizer | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._started = False
        self._start_lock = threading.Lock()  # matchers are built on the server's grammar threads too
        if warm:
            self._start()

    def _start(self) -> None:
        with self._start_lock:
            if self._started:
                return
            self._started = True
        threading.Thread(target=self._build, name="llguidance-tokenizer", daemon=True).start()

    def _build(self) -> None:
        try:
            import llguidance

            self._tokenizer = llguidance.LLTokenizer(self._tokenizer_json(), n_vocab=self.vocab_size,
                                                     eos_token=self._eos)
        except Exception as exc:  # noqa: BLE001 - reported to the first request that needs it
            self._error = exc
        finally:
            self._ready.set()

    def _llg_tokenizer(self, field: str) -> LLTokenizer:
        self._start()
        if not self._ready.wait(TOKENIZER_BUILD_TIMEOUT_S):
            raise EngineError(f"llguidance's token table was not built within {TOKENIZER_BUILD_TIMEOUT_S:.0f} s",
                              field=field, hint="retry; the instance is overloaded")
        if self._error is not None or self._tokenizer is None:
            raise EngineError(f"structured output cannot use this tokenizer: {self._error}", field=field)
        return self._tokenizer

    def matcher(self, spec: StructuredOutput) -> LLMatcher:
        """A new matcher of `spec`'s grammar over the engine's tokenizer: its compile takes as long as the grammar
        is large (a JSON schema of 1,000 keys: ~30 ms over a 49k vocabulary), so the server builds it off the engine
        thread (EngineLoop.submit); any thread may call this."""
        import llguidance

        tokenizer = self._llg_tokenizer(spec.field)
        try:
            matcher = llguidance.LLMatcher(tokenizer, spec.grammar())
        except (ValueError, RuntimeError) as exc:
            raise EngineError(f"{spec.field}: {exc}", field=spec.field) from None
        if matcher.is_error():
            raise EngineError(f"{spec.field}: {matcher.get_error()}", field=spec.field)
        return matcher


def grammar_backend(tokenizer: Tokenizer, vocab_size: int) -> GrammarBackend:
    """The backend of an engine's tokenizer; its grammars end with the tokenizer's first EOS."""
    eos = list(tokenizer.eos_token_ids)
    return GrammarBackend(tokenizer.to_json, vocab_size, eos[0] if eos else None)


def advance(matcher: LLMatcher, token_id: int) -> bool:
    """Feed an output token; True when the grammar is complete (only its EOS may follow, which it takes) or failed
    (`is_error`: the token broke it, or a token after a complete grammar was not EOS)."""
    matcher.consume_token(token_id)
    return bool(matcher.is_stopped() or matcher.is_error())


def apply_grammar_masks(logits: torch.Tensor, matchers: Sequence[LLMatcher | None],
                        failed: dict[int, Exception] | None = None) -> torch.Tensor:
    """logits: [N, V]; matchers: one per row, None where unconstrained. Returns masked logits
    (a new tensor when any row is constrained; logprobs come from it, as vLLM's do). With `failed`, a row whose
    matcher raises is recorded there (row -> exception) and left unmasked (its caller drops its token); without
    it the exception propagates."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    import llguidance.torch as llt
    import torch

    from pdlaunch.memory.platform import to_device_async

    num_rows, vocab = logits.shape
    words = -(-vocab // 32)
    mask = torch.full((num_rows, words), -1, dtype=torch.int32)  # all bits set: every token allowed
    for i, matcher in enumerate(matchers):
        if matcher is None:
            continue
        try:
            llt.fill_next_token_bitmask(matcher, mask, i)
        except Exception as exc:
            if failed is None:
                raise
            failed[i] = exc  # one request's grammar: the other rows are sampled as if it were not there
            mask[i] = -1
    mask = to_device_async(mask, logits.device)
    # Unpacked here rather than by llguidance.torch.apply_token_bitmask_inplace, which
    # torch.compiles its kernel on first use (seconds, and a C++ compiler on CPU).
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((mask.unsqueeze(-1) >> shifts) & 1).view(num_rows, words * 32)[:, :vocab]  # [N, V]
    return logits.masked_fill(allowed == 0, float("-inf"))

