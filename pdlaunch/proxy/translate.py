"""Request translation for the two PD legs, and upstream failures turned into OpenAI errors."""

from __future__ import annotations

import httpx
from pydantic import BaseModel, JsonValue, ValidationError

from pdlaunch.engine.context_limit import with_max_tokens
from pdlaunch.engine.kv_capacity import KVCapacity
from pdlaunch.http.errors import OpenAIError
from pdlaunch.http.limits import parse_json_object
from pdlaunch.http.retry_later import UNREACHABLE_RETRY_AFTER_S, RetryLater
from pdlaunch.http.shutdown_answer import SHUTTING_DOWN_CODE
from pdlaunch.kv_transfer.params import FIRST_TOKEN_IDS, RETURN_FIRST_TOKEN
from pdlaunch.proxy.bodies import Body, JsonObject, as_object, int_of, objects, token_limit
from pdlaunch.proxy.instances import Instance
from pdlaunch.server.chat_request import ChatCompletionRequest
from pdlaunch.server.choice_limits import no_room_hint
from pdlaunch.server.completion_request import CompletionRequest
from pdlaunch.server.decode_limits import DECODE_LIMITS_REFUSAL
from pdlaunch.server.request_fields import DEFAULT_MAX_TOKENS
from pdlaunch.server.responses import PROMPT_RECOMPUTED

# Dropped from the prefill leg: with max_tokens=1, a min_tokens of 2+ breaks vLLM's rule
# min_tokens <= max_tokens (a vLLM prefill answers 400); n / best_of / echo: the prompt's KV is
# computed once and the decode leg makes the samples; the decode leg keeps them all.
_DECODE_ONLY_FIELDS = ("stream_options", "min_tokens", "min_completion_tokens", "n", "best_of", "echo")
# The fields that set the decode leg's output limits (server/request_fields.DecodeLimits), by endpoint.
_LIMITS = ("max_tokens", "min_tokens")
_CHAT_LIMITS = ("max_tokens", "max_completion_tokens", "min_tokens")
DECODE_LIMITS = "decode_limits"
KV_CACHE = "kv_cache"  # in decode_limits: the decode's KV cache (engine/kv_capacity.py)


def prefill_body(body: Body, chat: bool, first_token: bool = False, decode_limits: bool = False,
                 decode_kv_cache: KVCapacity | None = None) -> JsonObject:
    """The prefill leg: one token, not streamed, and ask the prefill side to keep the KV for decode
    (and, with `first_token`, to sign the token it sampled into its answer for the decode to continue from).
    With `decode_limits` (our own instances: vLLM's would ignore the field), the output limits the decode leg applies
    go along as the client sent them, and the KV cache of the decode chosen for the request (`decode_kv_cache`, as its
    /health says it) where known, so that the prefill refuses a request its decode would before it computes the
    prompt (server/decode_limits.py)."""
    leg = {k: v for k, v in body.items() if k not in _DECODE_ONLY_FIELDS}
    if decode_limits:
        limits: JsonObject = {k: body[k] for k in (_CHAT_LIMITS if chat else _LIMITS) if k in body}
        if decode_kv_cache is not None:
            limits[KV_CACHE] = dict[str, JsonValue](decode_kv_cache.model_dump())
        leg[DECODE_LIMITS] = limits
    leg["max_tokens"] = 1
    if chat and "max_completion_tokens" in leg:
        leg["max_completion_tokens"] = 1
    leg["stream"] = False
    params: JsonObject = {"do_remote_decode": True}
    if first_token:
        params[RETURN_FIRST_TOKEN] = True
    leg["kv_transfer_params"] = params
    return leg


_COMPLETION_LIMIT, _LIMIT = " + max_completion_tokens (", " + max_tokens ("


def client_limit_error(exc: OpenAIError, body: Body, chat: bool) -> OpenAIError:
    """A prefill leg's "prompt + max_tokens (1) exceeds max_model_len" restated with the client's own
    max_tokens (the 1 is the leg's, not the client's); any other error unchanged. A chat's instance names
    max_completion_tokens there when the client sent it (server/choices.py), and so does this."""
    limit = token_limit(body, chat, "max_completion_tokens", "max_tokens")
    if limit is None and not chat and "max_tokens" not in body:
        limit = DEFAULT_MAX_TOKENS  # a completion that names no max_tokens gets 16, as the decode would say
    if int_of(limit) == 0:
        limit = 1  # echo's prompt alone: the engine samples one token and its refusal counts it (completion_request)
    if exc.status != 400:
        return exc
    if limit is None and with_max_tokens(exc.message, 0) is not None:  # no limit named: it may fill the context
        return OpenAIError(400, no_room_hint(exc.message, "messages" if chat else "prompt"), param=exc.param,
                           code=exc.code)
    if not isinstance(limit, int) or isinstance(limit, bool):
        return exc
    named = _COMPLETION_LIMIT in exc.message
    message = with_max_tokens(exc.message.replace(_COMPLETION_LIMIT, _LIMIT), limit)
    if message is None:
        return exc
    if named:
        message = message.replace(_LIMIT, _COMPLETION_LIMIT)
    return OpenAIError(400, message, param=exc.param, code=exc.code)


def continues_from_first_token(body: Body) -> bool:
    """Whether the decode may continue from the prefill's sampled token (engine/first_token.py). Not with
    several samples or echo (the decode makes those choices itself) nor min_tokens (the prefill leg drops
    it, so its token may be one min_tokens holds back): those decodes recompute the last prompt token."""
    several = any(body.get(k) not in (None, 1) for k in ("n", "best_of"))
    held_back = any(body.get(k) not in (None, 0) for k in ("min_tokens", "min_completion_tokens"))
    return not several and not held_back and not body.get("echo")


def ended_by_first_token(body: Body, chat: bool, answer: JsonObject) -> bool:
    """The prefill's answer is already the whole answer: its token stopped the request, or the client
    asked for one token. Only for answers that carry the first token (our prefill, asked for it)."""
    params = as_object(answer.get("kv_transfer_params"))
    choices = answer.get("choices")
    if params is None or not params.get(FIRST_TOKEN_IDS) or not isinstance(choices, list) or \
            len(choices) != 1 or not isinstance(choices[0], dict):
        return False
    reason = choices[0].get("finish_reason")
    limit = token_limit(body, chat, "max_completion_tokens", "max_tokens")
    return reason == "stop" or (reason == "length" and limit == 1)


def decode_body(body: Body, kv_transfer_params: JsonObject) -> JsonObject:
    """The decode leg: the client's request plus where its KV lies. Without prompt_logprobs: the decode
    loads the prompt's KV and never computes its logits; the prefill's answer carries them."""
    return {**{k: v for k, v in body.items() if k != "prompt_logprobs"}, "kv_transfer_params": kv_transfer_params}


def refuse_in_pd(body: Body, chat: bool) -> None:
    """echo with logprobs puts the prompt's logprobs inside each choice's logprobs, which the decode
    (that has no prompt logits) builds: refused in PD; prompt_logprobs alone are taken from the prefill."""
    if not chat and body.get("echo") and body.get("logprobs") is not None:
        raise OpenAIError(400, "echo with logprobs is not available through PD (the decode never computes the "
                               "prompt); send prompt_logprobs, or ask a colocated deployment", param="echo")


def with_prompt_logprobs(answer: JsonObject, prefill_answer: JsonObject, chat: bool) -> JsonObject:
    """The decode's whole answer with the prompt logprobs the prefill computed: top-level for chat,
    in every choice for completions (vLLM's places)."""
    if chat:
        return {**answer, "prompt_logprobs": prefill_answer.get("prompt_logprobs")}
    choices = objects(prefill_answer.get("choices"))
    prompt = choices[0].get("prompt_logprobs") if choices else None
    return {**answer, "choices": [{**c, "prompt_logprobs": prompt} for c in objects(answer.get("choices"))]}


def prefill_cached_tokens(prefill_answer: JsonObject) -> int | None:
    """The prompt tokens the prefill found in its prefix cache (its usage's cached_tokens), or None when its answer
    names no such count."""
    usage = as_object(prefill_answer.get("usage"))
    details = as_object(usage.get("prompt_tokens_details")) if usage is not None else None
    cached = int_of(details.get("cached_tokens")) if details is not None else None
    return cached if cached is not None and cached >= 0 else None


def with_cached_tokens(answer: JsonObject, cached: int | None) -> JsonObject:
    """The decode's answer (or a stream chunk of it) with `cached`, the prefill's count, as its usage's cached_tokens.
    In PD the prompt is computed by the prefill, minus what its prefix cache held: that is the count a user means
    (vLLM's too). The decode's own count says how much of the KV it held already rather than loaded, not what was
    computed; it stands when the decode computed the prompt itself after all (its answer says so: the KV could not
    be loaded, server/responses.PROMPT_RECOMPUTED; the mark is not passed on). An answer without usage, or whose
    prompt is shorter than `cached` (not a count of this prompt), or `cached` None, is left as it is."""
    recomputed, answer = _without_recompute_mark(answer)
    if recomputed or cached is None:
        return answer
    usage = as_object(answer.get("usage"))
    prompt = int_of(usage.get("prompt_tokens")) if usage is not None else None
    if usage is None or prompt is None or cached > prompt:
        return answer
    details = as_object(usage.get("prompt_tokens_details")) or {}
    return {**answer, "usage": {**usage, "prompt_tokens_details": {**details, "cached_tokens": cached}}}


def _without_recompute_mark(answer: JsonObject) -> tuple[bool, JsonObject]:
    """(whether the decode's answer says it computed the prompt itself, the answer without that mark)."""
    params = as_object(answer.get("kv_transfer_params"))
    if params is None or PROMPT_RECOMPUTED not in params:
        return False, answer
    rest = {k: v for k, v in params.items() if k != PROMPT_RECOMPUTED}
    out = {k: v for k, v in answer.items() if k != "kv_transfer_params"}
    if rest:
        out["kv_transfer_params"] = rest
    return params[PROMPT_RECOMPUTED] is True, out


def kv_params_of(instance: Instance, response_json: JsonValue) -> JsonObject:
    answer = as_object(response_json)
    params = as_object(answer.get("kv_transfer_params")) if answer is not None else None
    if not params:
        raise OpenAIError(502, f"{instance.name} ({instance.url}) answered the prefill leg without "
                               "kv_transfer_params; is it a prefill instance with a KV connector?",
                          code="bad_prefill_response")
    return params


def parse_client_body(raw: bytes, chat: bool) -> JsonObject:
    """The client's body, refused with a 400 naming the field unless it is JSON an instance accepts:
    finite, shallow, valid Unicode (http/limits.py), with every sampling value in range. Checked
    here so that a bad request never costs a prefill leg (nor holds KV for a decode that refuses it).
    Fields the instances may support and we do not know (n, echo) are left for them to judge."""
    body = parse_json_object(raw)
    if DECODE_LIMITS in body:  # the proxy's own, on a prefill leg it sends; a client's would describe no leg
        raise OpenAIError(400, DECODE_LIMITS_REFUSAL, param=DECODE_LIMITS)
    request = (ChatCompletionRequest if chat else CompletionRequest).model_validate(body)
    request.sampling_params()
    return body


class _InstanceError(BaseModel):
    message: str
    param: str | None = None
    code: str | int | None = None  # vLLM's is the HTTP status, a number


class _InstanceErrorBody(BaseModel):
    """An OpenAI-format error answer (other fields, vLLM's `type` and `object` among them, are not read)."""

    error: _InstanceError


def error_from_response(instance: Instance, status: int, content: bytes,
                        retry_after_s: int | None = None) -> OpenAIError:
    """An instance's non-200 answer. 4xx are the client's problem and pass through unchanged;
    503 stays 503 (try again), with the instance's Retry-After (`retry_after_s`, http/retry_later.py) where it
    sent one; any other 5xx becomes a 502 naming the instance. A body that is not an
    OpenAI-format error (a message that is not text, say) is quoted as the message."""
    message, param, code = f"HTTP {status}", None, None
    try:
        err = _InstanceErrorBody.model_validate_json(content).error
        # vLLM's int code is the HTTP status: error_body writes it again from the status answered here
        message, param, code = err.message, err.param, err.code if isinstance(err.code, str) else None
    except ValidationError:
        if content:
            message = content[:200].decode(errors="replace")
    if status < 500:
        return OpenAIError(status, message, param=param, code=code)
    if status == 503:
        message = f"{instance.name} is unavailable: {message}"
        if retry_after_s is not None:
            return RetryLater(message, code or "unavailable", retry_after_s)
        return OpenAIError(503, message, code=code or "unavailable")
    return OpenAIError(502, f"{instance.name} ({instance.url}) failed: {message}", code=code or "instance_failed")


def error_from_exception(instance: Instance, exc: BaseException, timeout_s: float) -> OpenAIError:
    """A failed call to an instance: unreachable -> 503, dropped connection -> 502, too slow -> 504."""
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return RetryLater(f"{instance.name} ({instance.url}) is unreachable: {exc or type(exc).__name__}",
                          "instance_unreachable", UNREACHABLE_RETRY_AFTER_S)
    if isinstance(exc, (httpx.TimeoutException, TimeoutError)):
        return OpenAIError(504, f"request timed out after {timeout_s:g}s waiting for {instance.name} "
                                "(proxy.request_timeout_seconds)", code="timeout")
    if is_connection_failure(exc):
        return DroppedConnection(f"{instance.name} ({instance.url}) closed the connection mid-request "
                                 f"({exception_text(exc)}): it died, restarted or dropped the request; retry it "
                                 "(GET /instances shows the instance's state)")
    return OpenAIError(502, f"{instance.name} ({instance.url}) failed mid-request: {exception_text(exc)}",
                       code="instance_failed")


def exception_text(exc: BaseException) -> str:
    """`ReadError: why`, or the bare class name: httpx's ReadError from a killed peer has no text, and a message
    ending `ReadError: ` read as if its reason had been cut off."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class DroppedConnection(OpenAIError):
    """An instance dropped the connection before answering (502, code instance_failed). Whether the leg may
    go to another instance is decided from this, not from the instance's state: a health probe answered
    just before the drop can mark the instance ready again before the retry decision runs."""

    def __init__(self, message: str) -> None:
        super().__init__(502, message, code="instance_failed")


def is_shutting_down(exc: OpenAIError) -> bool:
    """The instance answered 503 shutting_down: it is stopping (SIGTERM, its pod deleted; http/shutdown_answer.py) and
    cut the request, or refused it, before any of its answer was sent: as gone as one that dropped the connection."""
    return exc.status == 503 and exc.code == SHUTTING_DOWN_CODE


def is_connection_failure(exc: BaseException) -> bool:
    """Failures that say the instance itself is gone (mark it down), not just slow."""
    return isinstance(exc, (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError))
