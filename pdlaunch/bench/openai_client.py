"""One streaming request of `pdlaunch bench serve` to an OpenAI-compatible server (`ignore_eos` and `max_tokens`,
so output lengths are exact), timed as report.py defines; and the model the server serves."""

from __future__ import annotations

import asyncio
import html
import json
import re
import time
from collections.abc import Callable, Mapping

import httpx
from pydantic import JsonValue

from pdlaunch.bench.report import RequestResult
from pdlaunch.bench.serve_config import ServeBenchConfig
from pdlaunch.bench.served_length import ServedModel, listed_max_model_len
from pdlaunch.bench.workload import BenchRequest
from pdlaunch.errors import PdlaunchError

# finish_reason of a request the server gave up on (pdlaunch's engine, vLLM): its answer is not whole
CUT_SHORT = frozenset({"abort", "error"})
OnChoice = Callable[[Mapping[str, object]], None]  # sees every streamed choice (multi_turn.py keeps the answers)
ERROR_BODY_CHARS = 300  # of an error answer's body, in a request's error
CONNECT_TIMEOUT_S = 30.0  # to open a connection (--request-timeout bounds the whole request)
_TAG = re.compile(r"<[^>]*>")
# What a page holds that is not its text: CSS and scripts (a head's <style> filled the line before the page's words)
# and comments, whose contents may hold `>` or tags of their own
_NOT_TEXT = re.compile(r"<(style|script)\b[^>]*>.*?</\1\s*>|<!--.*?-->", re.IGNORECASE | re.DOTALL)


def error_body_text(body: str, content_type: str) -> str:
    """An error answer's body as one line of at most ERROR_BODY_CHARS: an HTML page (a web server's or a gateway's
    error page, not an OpenAI server's JSON) without its markup, every run of whitespace one space, so that the
    error list and the final error say the server's words, a request a line (its styles and scripts are no words)."""
    if "html" in content_type.lower() or body.lstrip()[:1] == "<":
        body = html.unescape(_TAG.sub(" ", _NOT_TEXT.sub(" ", body)))
    return " ".join(body.split())[:ERROR_BODY_CHARS]


def _payload(cfg: ServeBenchConfig, model: str, req: BenchRequest) -> dict[str, JsonValue]:
    body: dict[str, JsonValue] = {
        "model": model,
        "max_tokens": req.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if req.return_token_ids:
        body["return_token_ids"] = True
    prompt: JsonValue = req.prompt if isinstance(req.prompt, str) else [*req.prompt]
    if cfg.is_chat:
        first_turn: JsonValue = {"role": "user", "content": prompt}
        turns: list[JsonValue] = [{**m} for m in req.messages] if req.messages else [first_turn]
        body["messages"] = turns
        body["max_completion_tokens"] = req.output_len
    else:
        body["prompt"] = prompt
    return body


async def _stream(client: httpx.AsyncClient, cfg: ServeBenchConfig, model: str, req: BenchRequest,
                  result: RequestResult, st: float, on_choice: OnChoice | None = None) -> int:
    """Send one request and read its stream into `result` (times relative to `st`); returns the
    number of chunks that carried a choice (each handed to `on_choice`). Sets `result.error` for an
    HTTP or in-stream error, a chunk that is not a JSON object, a choice the server finished as aborted
    or failed, a stream that ended before [DONE] (cut short: its tokens are not the whole answer), an answer not
    streamed at all (a server that ignores `stream: true`), and an
    answer the server's usage counts 0 completion tokens for (no token: nothing to time)."""
    chunks = 0
    last = st
    done = False
    events = 0  # `data:` lines: none in a body that is no event stream is an answer not streamed, not one cut short
    usage_seen = False  # the server counted the answer's tokens (usage.completion_tokens)
    async with client.stream("POST", cfg.url, json=_payload(cfg, model, req)) as resp:
        if resp.status_code != 200:
            body = (await resp.aread()).decode(errors="replace")
            location = resp.headers.get("location") if resp.is_redirect else None
            said = (f"redirected to {location}, which bench serve does not follow: give that server in --base-url"
                    if location else error_body_text(body, resp.headers.get("content-type", "")))
            result.error = f"HTTP {resp.status_code}: {said}"  # a redirect's body is mostly empty
            return chunks
        async for line in resp.aiter_lines():
            line = line.strip()
            if not line.startswith("data:"):
                continue
            events += 1
            data_str = line[len("data:"):].strip()
            if data_str == "[DONE]":
                done = True
                break
            try:
                data = json.loads(data_str)
            except json.JSONDecodeError:
                result.error = f"a stream chunk is not JSON: {data_str[:300]}"
                return chunks
            if not isinstance(data, dict):
                result.error = f"a stream chunk is not a JSON object: {data_str[:300]}"
                return chunks
            if data.get("error"):
                result.error = f"server error in stream: {str(data['error'])[:300]}"
                return chunks
            if data.get("choices"):
                choices = data["choices"]
                if not (isinstance(choices, list) and all(isinstance(c, dict) for c in choices)):
                    # counted as a token, such a chunk made a TTFT and a token count out of no token
                    result.error = f"a stream chunk's choices are not a list of objects: {data_str[:300]}"
                    return chunks
                ended = {c.get("finish_reason") for c in choices} & CUT_SHORT
                if ended:
                    result.error = (f"the server ended the request with finish_reason {ended.pop()} after "
                                    f"{chunks + 1} chunk(s)")
                    return chunks
                if on_choice is not None:
                    for choice in choices:
                        on_choice(choice)
                now = time.perf_counter()
                if chunks == 0:
                    result.ttft = now - st
                else:
                    result.itl.append(now - last)
                last = now
                result.latency = now - st
                chunks += 1
            usage = data.get("usage")
            if isinstance(usage, dict):
                completion = usage.get("completion_tokens")
                prompt = usage.get("prompt_tokens")
                if not all(count is None or (type(count) is int and count >= 0) for count in (completion, prompt)):
                    result.error = f"the stream's usage counts are not token counts (integers >= 0): {data_str[:300]}"
                    return chunks
                if completion is not None:  # 0 is a count (an answer without a token), not a missing one
                    result.output_len = completion
                    usage_seen = True
                result.prompt_len = prompt or req.prompt_len
    kind = resp.headers.get("content-type", "").split(";")[0].strip()
    if not events and kind != "text/event-stream":  # an event stream without events is one cut short
        kind = kind or "a body without a content type"
        result.error = (f"the server answered {kind} with no stream event (`data:` line): it did not stream the "
                        "answer, which bench serve asks for (stream: true) to time its tokens")
    elif not done:
        result.error = f"the stream ended before [DONE] after {chunks} chunk(s): the answer was cut short"
    elif usage_seen and result.output_len == 0 and chunks:
        # Its chunks carried no token (a role, an empty text): a TTFT taken from them times no token.
        result.error = f"the server reported 0 completion tokens after {chunks} chunk(s): no token was generated"
    return chunks


async def send_request(client: httpx.AsyncClient, cfg: ServeBenchConfig, model: str, req: BenchRequest,
                       bench_start: float, on_choice: OnChoice | None = None) -> RequestResult:
    """One streaming request, at most `request_timeout` s in all. Never raises: a failure is a
    result with `error` set."""
    result = RequestResult(prompt_len=req.prompt_len)
    st = time.perf_counter()
    result.start = st - bench_start
    try:
        chunks = await asyncio.wait_for(_stream(client, cfg, model, req, result, st, on_choice), cfg.request_timeout)
    except httpx.ConnectTimeout:  # its own limit, which ran out before --request-timeout's
        result.error = (f"could not connect to {cfg.url} within {CONNECT_TIMEOUT_S:g}s (the server accepted no "
                        "connection in that time: overloaded, or an address that drops connections)")
        return result
    except (asyncio.TimeoutError, httpx.TimeoutException):
        result.error = f"timed out after {cfg.request_timeout:g}s waiting for {cfg.url} to finish a request"
        return result
    except (httpx.HTTPError, json.JSONDecodeError, TypeError, ValueError) as exc:  # also a usage count not a number
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    if result.error:
        return result
    if chunks == 0:
        result.error = "no chunk with a choice received (cannot measure TTFT)"
        return result
    result.success = True
    if result.output_len == 0:
        result.output_len = chunks  # server sent no completion_tokens: one token per chunk
    return result


async def resolve_model(client: httpx.AsyncClient, cfg: ServeBenchConfig) -> ServedModel:
    """Check the server answers, and pick the model: --model, else the first of GET /v1/models; with the
    max_model_len the listing gives for it (served_length.py checks the workload against it)."""
    try:
        resp = await client.get(cfg.models_url, timeout=30.0)
    except httpx.ConnectError as exc:
        if "SSL" in str(exc):  # https:// to a plain HTTP server: the TLS handshake got an HTTP answer
            raise PdlaunchError(
                f"the TLS handshake with {cfg.base_url} failed ({exc})", field="--base-url",
                hint="does the server speak https? pdlaunch's proxy and instances serve http://",
            ) from None
        raise PdlaunchError(
            f"cannot connect to {cfg.base_url}", field="--base-url", hint="is the server running and the URL right?"
        ) from None
    except httpx.TimeoutException:
        raise PdlaunchError(
            f"no answer from {cfg.models_url} within 30s", field="--base-url", hint="is the server overloaded?"
        ) from None
    except httpx.HTTPError as exc:  # e.g. a port whose server is not HTTP closes the connection
        raise PdlaunchError(
            f"{cfg.models_url} gave no HTTP answer ({type(exc).__name__}: {exc})", field="--base-url",
            hint="is that the OpenAI server's port?",
        ) from None
    if resp.status_code in (401, 403):  # pdlaunch's and vLLM's --api-key: every route but /health needs it
        refused = "refused the API key given" if cfg.api_key else "needs an API key"
        raise PdlaunchError(
            f"{cfg.models_url} answered HTTP {resp.status_code}: the server {refused}", field="--api-key",
            hint="pass the key the server was started with (`pdlaunch serve --api-key`), as --api-key KEY or in "
                 "PDLAUNCH_API_KEY",
        )
    try:
        listing = resp.json() if resp.status_code == 200 else {}
    except ValueError:
        listing = {}
    listed = listing.get("data") if isinstance(listing, dict) else None
    models: list[object] = [*listed] if isinstance(listed, list) else []
    if cfg.model:
        entry = next((m for m in models if isinstance(m, dict) and m.get("id") == cfg.model), None)
        return ServedModel(cfg.model, listed_max_model_len(entry))
    first = models[0] if models else None
    if resp.status_code != 200:
        # Every OpenAI-compatible server (pdlaunch's proxy and instances, vLLM) lists its models: a 404 here is
        # another service's port or a URL with a path the API is not under, which --model would not mend.
        raise PdlaunchError(
            f"{cfg.models_url} answered HTTP {resp.status_code}, not the model list an OpenAI-compatible server "
            "gives", field="--base-url",
            hint="give that server's root, e.g. http://127.0.0.1:8000 (the port `pdlaunch serve` printed); for a "
                 "server without /v1/models pass --model NAME",
        )
    if not isinstance(first, dict) or not first.get("id"):
        raise PdlaunchError(
            f"{cfg.models_url} answered HTTP {resp.status_code} without a model list", field="--model",
            hint="pass --model NAME",
        )
    return ServedModel(str(first["id"]), listed_max_model_len(first))
