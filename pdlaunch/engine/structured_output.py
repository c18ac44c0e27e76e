"""Structured output with llguidance: a grammar per request, token masks applied in the sampler.

Why llguidance (over xgrammar): measured on this project's CPU host with SmolLM2's 49k vocabulary
and a JSON schema, a step of 64 constrained rows (fill the masks, apply them, advance the
matchers) took 2.8 ms p50 with llguidance and 11.6 ms with xgrammar (benchmarks/RESULTS.md), and
llguidance needs no other package (xgrammar pulls transformers, triton and tvm-ffi).

A request's `StructuredOutput` (kind + value, from response_format, structured_outputs or the guided_* fields, or a
tool choice's calls: server/tool_calls.py, strict auto's in engine/tool_calls_grammar.py, a JSON answer beside them
one of their grammar's choices) becomes an llguidance grammar, once it is within the bounds of what may
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
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator

from pdlaunch.engine.grammar_limits import build_error, byte_matcher, is_limit_error, probe
from pdlaunch.engine.grammar_size import check_grammar_size, check_schema_size, check_text_size
from pdlaunch.engine.grammar_stack import on_grammar_stack
from pdlaunch.engine.schema_refs import MAX_DEPTH, SchemaError, root_pointers
from pdlaunch.engine.strict_schema import close_objects
from pdlaunch.engine.tool_calls_grammar import AddedTokens, tool_calls_grammar
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
    # JSON schema text, regex, JSON list of choices, Lark / GBNF grammar, or tool calls (a `ToolCallsFormat`'s JSON)
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
            schema = self.json_schema()
            if isinstance(schema, bool):  # `true`, `false`: llguidance applies `defaults` to an object only
                schema = {"anyOf": [schema]}
            return str(llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), defaults={"whitespace_flexible": self.any_whitespace}))
        if self.kind == "tool_calls":
            return self._tool_calls_grammar(added)
        if self.kind == "grammar":
            check_grammar_size(self.value, self.field)
        elif self.kind == "regex":
            check_text_size(self.value)
        return str(llguidance.grammar_from(_FORMATS[self.kind], self.value))

    def json_schema(self) -> JsonValue:
        """A json or json_object output's schema as llguidance is to compile it: every `$ref` resolved (or a
        SchemaError naming where: engine/schema_refs.py), objects closed unless asked open, within the size bounds
        (checked before llguidance spends seconds on it)."""
        if self.kind == "json_object":
            return {"type": "object"}
        if self.kind != "json":
            raise ValueError(f"{self.field}: a {self.kind} output has no JSON schema")
        try:
            sent = json.loads(self.value)
        except ValueError as exc:  # structured_outputs.json / guided_json sent as a string
            raise SchemaError(f"the JSON schema is not JSON ({exc})", field=self.field) from None
        except RecursionError:  # nested past the parser's recursion, far past MAX_DEPTH
            raise SchemaError(f"the schema nests deeper than {MAX_DEPTH} levels", field=self.field) from None
        if not isinstance(sent, dict | bool):
            kind = {list: "a list", str: "a string", type(None): "null"}.get(type(sent), "a number")
            raise SchemaError(f"the JSON schema must be a JSON object (or true / false), not {kind}",
                              field=self.field)
        schema = root_pointers(sent, self.field)
        if self.strict or not self.open_objects:
            schema = close_objects(schema)
        check_schema_size(schema, self.field)
        return schema

    def _tool_calls_grammar(self, added: AddedTokens | None) -> str:
        calls = ToolCallsFormat.model_validate_json(self.value)
        tools = [(t.name, t.arguments.json_schema() if t.arguments is not None else None) for t in calls.tools]
        # each schema once, all of them within a schema's bounds (as a required call's array of every tool)
        check_schema_size({"anyOf": [schema for _, schema in tools if schema is not None]}, self.field)
        answer = calls.answer.json_schema() if calls.answer is not None else None
        return tool_calls_grammar(tools, calls.start, calls.end, calls.parallel, self.any_whitespace, added, answer)


class CalledTool(BaseModel):
    """A tool that tool calls' grammar lets the model call."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    arguments: StructuredOutput | None = None  # a strict tool's parameters (json); None: any JSON object

    @field_validator("arguments")
    @classmethod
    def _json(cls, value: StructuredOutput | None) -> StructuredOutput | None:
        if value is not None and value.kind != "json":
            raise ValueError("a tool's arguments are a JSON schema (kind json)")
        return value


class ToolCallsFormat(BaseModel):
    """What a `tool_calls` output is (engine/tool_calls_grammar.py): Hermes / Qwen calls between `start` and `end`,
    in free text or, beside an `answer` (the JSON that response_format / structured_outputs asks for), instead of it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tools: list[CalledTool] = Field(min_length=1)
    start: str
    end: str
    parallel: bool = True
    answer: StructuredOutput | None = None

    @field_validator("answer")
    @classmethod
    def _json(cls, value: StructuredOutput | None) -> StructuredOutput | None:
        if value is not None and value.kind not in ("json", "json_object"):
            raise ValueError("the answer beside tool calls is JSON (kind json or json_object)")
        return value


def check(spec: StructuredOutput) -> str:
    """The grammar of `spec`, compiled once (over single bytes) to find errors, and its first steps run to find the
    llguidance limits it exceeds (engine/grammar_limits.py); ValueError naming what is wrong."""
    try:
        grammar = spec.grammar()
    except SchemaError:
        raise  # names the place in the schema: a $ref, an $id, what nests too deep, an object of too many keys
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"{spec.field}: {exc}") from None
    # Tool calls in free text: the probe's lowest bytes never write the marker, and a call's start is where the grammar
    # is widest (three items of llguidance's parser row a tool: 700 tools make 2,103, past its 2,000), so a call's
    # first bytes are probed too.
    call_start = ToolCallsFormat.model_validate_json(spec.value).start if spec.kind == "tool_calls" else None
    try:
        problem = on_grammar_stack(lambda: _first_problem(grammar, call_start))
    except TimeoutError as exc:
        raise ValueError(f"{spec.field}: {exc}; send a smaller grammar") from None
    if problem is not None:
        raise ValueError(f"{spec.field}: {problem}")
    return grammar


def _first_problem(grammar: str, call_start: str | None = None) -> str | None:
    """What is wrong with `grammar`, or None; on a thread with the stack a compile needs. `call_start`: tool calls'
    marker, after which a call's first bytes are probed as the output's are."""
    import llguidance

    matcher = byte_matcher(grammar)
    if matcher.is_error():
        too_large = build_error(matcher)
        if too_large is not None:
            return f"the grammar is too large: llguidance cannot build it ({too_large}); send a smaller one"
        # Invalid, or valid but naming tokens a byte tokenizer lacks (special tokens): not probed.
        return llguidance.LLMatcher.validate_grammar(grammar).strip() or None
    call = matcher.deep_copy() if call_start is not None else None
    stuck = probe(matcher)
    where, smaller = "its first output bytes", "use a smaller pattern, schema or choice list"
    if stuck is None and call is not None and call_start is not None:
        where, smaller = "a tool call's first bytes", "send fewer tools, or none strict (auto is then not constrained)"
        stuck = probe(call, opened=call_start.encode())
    if stuck is None:
        return None
    if is_limit_error(stuck):
        return f"the grammar is too large: it runs past llguidance's limits in {where} ({stuck}); {smaller}"
    # not a size: the grammar admits nothing there (a schema that only refers to itself, `{"$ref": "#"}`)
    return f"the grammar cannot be followed in {where} ({stuck}): no output can match it there; correct the grammar"


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

