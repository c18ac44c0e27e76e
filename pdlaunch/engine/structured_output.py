"""Structured output with llguidance: a grammar per request, token masks applied in the sampler.

Why llguidance (over xgrammar): measured on this project's CPU host with SmolLM2's 49k vocabulary
and a JSON schema, a step of 64 constrained rows (fill the masks, apply them, advance the
matchers) took 2.8 ms p50 with llguidance and 11.6 ms with xgrammar (benchmarks/RESULTS.md), and
llguidance needs no other package (xgrammar pulls transformers, triton and tvm-ffi).

A request's `StructuredOutput` (kind + value, from response_format, structured_outputs or the guided_* fields, or a
tool choice's calls: server/tool_calls.py) becomes an llguidance grammar, once it is within the bounds of what may
be compiled (engine/grammar_size.py: an object's keys, a regex's length, ...); `check` compiles it once on the HTTP
side, over single bytes, and runs its first steps, where a grammar too large for llguidance's limits fails (400
naming the request field; engine/grammar_limits.py). Every compile runs on a thread with a large stack
(engine/grammar_stack.py): llguidance recurses once for each `$ref` or rule of a chain. The engine compiles the
grammar again over its own tokenizer (a compiled grammar is bound to its tokenizer's tokens), one `LLMatcher` per
request (`GrammarBackend.matcher`); each step the sampler fills the constrained rows of one int32 bitmask
[N, ceil(V / 32)] and applies it to the logits (everything else of the batch passes: all bits set), and the output
processor advances the matcher with the sampled token. When the grammar is complete only EOS stays allowed: the request
samples it and stops there, the EOS counted as an output token (vLLM's; engine/output_processor.py).

PD: the prefill leg samples its one token under the same grammar (the leg carries the request's
structured-output fields). A decode that continues from that token (engine/first_token.py) takes
it through OutputProcessor.append_token like a token sampled here, which advances its matcher
from the prompt state; a decode that recomputes the last prompt token samples the first token
under its own fresh matcher. Either way both legs' grammar state starts at the prompt and agrees.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, JsonValue

from pdlaunch.engine.grammar_limits import build_error, byte_matcher, is_limit_error, probe
from pdlaunch.engine.grammar_size import check_grammar_size, check_schema_size, check_text_size
from pdlaunch.engine.grammar_stack import on_grammar_stack
from pdlaunch.engine.schema_refs import SchemaError, root_pointers
from pdlaunch.engine.strict_schema import close_objects
from pdlaunch.errors import EngineError

if TYPE_CHECKING:  # llguidance is imported where a grammar is first needed; torch where masks are (the proxy
    # reads these request models and needs no torch)
    import torch
    from llguidance import LLMatcher, LLTokenizer

    from pdlaunch.model.tokenizer import Tokenizer

Kind = Literal["json", "json_object", "regex", "choice", "grammar", "tool_calls"]
TOKENIZER_BUILD_TIMEOUT_S = 120.0
_FORMATS: dict[str, Literal["regex", "choice", "grammar"]] = {"regex": "regex", "choice": "choice",
                                                              "grammar": "grammar"}


class StructuredOutput(BaseModel):
    """What the output must match. `field`: the request field it came from (for errors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Kind
    # JSON schema text, regex, JSON list of choices, Lark / GBNF grammar, or tool calls in free text (JSON of
    # `tool_calls_grammar`'s arguments: {"calls", "start", "end", "parallel"})
    value: str
    field: str = "structured_outputs"
    # JSON without free whitespace between tokens unless asked (structured_outputs
    # disable_any_whitespace: false): small models otherwise emit whitespace until max_tokens.
    any_whitespace: bool = False
    # Object schemas that declare `properties` and say nothing of `additionalProperties` are closed
    # (close_objects) unless asked (structured_outputs disable_additional_properties: false).
    open_objects: bool = False
    # The schema said `strict: true` (OpenAI's; server/strict_field.py): its objects are closed whatever
    # open_objects says, as explicit `"additionalProperties": false` would be.
    strict: bool = False

    def grammar(self, added: AddedTokens | None = None) -> str:
        """llguidance's grammar of this output; `added`: the added tokens of the tokenizer it is compiled for (tool
        calls' free text and markers may be written with them), None: over bytes alone."""
        import llguidance

        if self.kind in ("json", "json_object"):
            text = '{"type": "object"}' if self.kind == "json_object" else self.value
            if self.kind == "json":  # every $ref resolved, or a SchemaError naming where (engine/schema_refs.py)
                schema = root_pointers(json.loads(text), self.field)
                if self.strict or not self.open_objects:
                    schema = close_objects(schema)
                check_schema_size(schema, self.field)  # as llguidance will compile it, before it spends seconds
                text = json.dumps(schema)
            return str(llguidance.LLMatcher.grammar_from_json_schema(
                text, defaults={"whitespace_flexible": self.any_whitespace}))
        if self.kind == "tool_calls":
            return tool_calls_grammar(**json.loads(self.value), field=self.field, any_whitespace=self.any_whitespace,
                                      added=added)
        if self.kind == "grammar":
            check_grammar_size(self.value, self.field)
        elif self.kind == "regex":
            check_text_size(self.value)
        return str(llguidance.grammar_from(_FORMATS[self.kind], self.value))


@dataclass(frozen=True)
class AddedTokens:
    """The added tokens of a tokenizer (its special ones and the others it adds, as Qwen's `<tool_call>` or `<think>`):
    llguidance reads every one as special, which a text literal or regex never matches; a grammar names one as
    `<text>` or `<[id]>`."""

    ids: Mapping[str, int]  # text -> token id
    eos: frozenset[int]  # the grammar's EOS: it ends the output, never a token the grammar names

    @staticmethod
    def of(tokenizer: LLTokenizer) -> AddedTokens:
        found = (i for i in range(tokenizer.vocab_size) if tokenizer.is_special_token(i))  # ~4 ms for 49k tokens
        # newer llguidance lists every EOS id (eos_tokens); 1.6 has eos_token alone (pyproject allows >= 1.0)
        eos = getattr(tokenizer, "eos_tokens", None) or [tokenizer.eos_token]
        return AddedTokens({tokenizer.decode_bytes([i]).decode("utf-8", "replace"): i for i in found}, frozenset(eos))


def tool_calls_grammar(calls: JsonValue, start: str, end: str, parallel: bool, field: str,
                       any_whitespace: bool = False, added: AddedTokens | None = None) -> str:
    """Free text with tool calls in it: any text until the model writes `start` (a lazy lexeme: it ends at the first
    `start`), then one JSON object of the schema `calls` (each tool's {"name", "arguments"}), then `end`, then free
    text or (`parallel`) another call. Where no call has begun any text goes, EOS included; once `start` is written
    the call must follow. Without `parallel` the text after a call may not hold `start` again. The JSON is written
    with ", " and ": " (as json.dumps writes it, the form tool-calling models learnt) unless `any_whitespace`.

    Over a tokenizer's `added` tokens (llguidance reads each as special, which text never matches): a marker the
    tokenizer holds as one token (Qwen's `<tool_call>` and `</tool_call>`) may be written as that token too, which is
    how the model writes it, and the free text may hold the other added tokens (Qwen 3's `<think>`), as it may
    unconstrained: bytes alone would forbid the tokens the model was trained to write."""
    import llguidance

    schema = root_pointers(calls, field)
    check_schema_size(schema, field)
    if not isinstance(schema, dict):
        raise SchemaError("the tool calls' schema must be an object", field=field)
    layout: JsonValue = ({"whitespace_flexible": True} if any_whitespace else
                         {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
    body = json.dumps({**schema, "x-guidance": layout})
    no_start = f"/(?s:.*)/ & ~/(?s:.*){_lark_regex(start)}(?s:.*)/"  # text that does not hold `start`
    ids = dict(added.ids) if added is not None else {}
    start_token, end_token = ids.pop(start, None), ids.get(end)
    others = sorted(i for i in ids.values() if added is None or i not in added.eos)  # `end`'s too: a stray one is text
    # free text before a call, and the rest: text without `start` and the other added tokens, in turns
    texts = f"(REST <[{','.join(map(str, others))}]>)* " if others else ""
    lark = "\n".join([
        "%llguidance {}",
        f"start: call{'*' if parallel else '?'} {texts}{'TEXT' if parallel else 'REST'}",
        "call: head SPACE body SPACE end",
        # the text up to the first `start` written in bytes, or text without it and then `start`'s token
        f"head: {texts}text_head{f' | {texts}REST <[{start_token}]>' if start_token is not None else ''}",
        f"text_head[lazy]: TEXT {json.dumps(start)}",
        f"end: {json.dumps(end)}{f' | <[{end_token}]>' if end_token is not None else ''}",
        f"body: %json {body}",
        r"SPACE: /[ \n]{0,2}/",  # Hermes / Qwen put a newline on each side of the JSON
        r"TEXT: /(?s:.*)/",
        f"REST: {no_start}",
    ])
    return str(llguidance.LLMatcher.grammar_from_lark(lark))


def _lark_regex(text: str) -> str:
    """`text` matched literally inside a Lark `/.../` regex."""
    return "".join(c if c.isalnum() or c in "_<>" else "\\" + c for c in text)


def check(spec: StructuredOutput) -> str:
    """The grammar of `spec`, compiled once (over single bytes) to find errors, and its first steps run to find the
    llguidance limits it exceeds (engine/grammar_limits.py); ValueError naming what is wrong."""
    try:
        grammar = spec.grammar()
    except SchemaError:
        raise  # names the place in the schema: a $ref, an $id, what nests too deep, an object of too many keys
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"{spec.field}: {exc}") from None
    try:
        problem = on_grammar_stack(lambda: _first_problem(grammar))
    except TimeoutError as exc:
        raise ValueError(f"{spec.field}: {exc}; send a smaller grammar") from None
    if problem is not None:
        raise ValueError(f"{spec.field}: {problem}")
    return grammar


def _first_problem(grammar: str) -> str | None:
    """What is wrong with `grammar`, or None; on a thread with the stack a compile needs."""
    import llguidance

    matcher = byte_matcher(grammar)
    if matcher.is_error():
        too_large = build_error(matcher)
        if too_large is not None:
            return f"the grammar is too large: llguidance cannot build it ({too_large}); send a smaller one"
        # Invalid, or valid but naming tokens a byte tokenizer lacks (special tokens): not probed.
        return llguidance.LLMatcher.validate_grammar(grammar).strip() or None
    stuck = probe(matcher)
    if stuck is None:
        return None
    what = "too large: it runs past llguidance's limits" if is_limit_error(stuck) else "cannot be followed"
    return f"the grammar is {what} in its first output bytes ({stuck}); use a smaller pattern, schema or choice list"


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
        self._added: AddedTokens | None = None  # read from the tokenizer once a grammar needs them
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

    def _added_tokens(self, tokenizer: LLTokenizer) -> AddedTokens:
        with self._start_lock:
            if self._added is None:
                self._added = AddedTokens.of(tokenizer)
            return self._added

    def matcher(self, spec: StructuredOutput) -> LLMatcher:
        """A new matcher of `spec`'s grammar over the engine's tokenizer: its compile takes as long as the grammar
        is large (a JSON schema of 1,000 keys: ~30 ms over a 49k vocabulary), so the server builds it off the engine
        thread (EngineLoop.submit); any thread may call this."""
        import llguidance

        tokenizer = self._llg_tokenizer(spec.field)
        try:
            # only tool calls' grammar names added tokens: the others need not read them
            grammar = spec.grammar(self._added_tokens(tokenizer) if spec.kind == "tool_calls" else None)
            matcher = on_grammar_stack(lambda: llguidance.LLMatcher(tokenizer, grammar))
        except TimeoutError as exc:
            raise EngineError(f"{spec.field}: {exc}", field=spec.field,
                              hint="retry; the instance is overloaded") from None
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

