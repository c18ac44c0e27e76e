"""`pdlaunch bench serve`: a load generator for any OpenAI-compatible server.

Random prompts (token ids, or words for chat endpoints) with random lengths around the asked
ones, arrivals as a gamma process (Poisson at burstiness 1, like vLLM), an optional concurrency
cap, streaming requests with `ignore_eos` and `max_tokens` so output lengths are exact. Timing and
metric definitions: see report.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import httpx
import numpy as np
from pydantic import BaseModel, Field, JsonValue, field_validator, model_validator
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pdlaunch.bench.report import (
    BenchMetrics,
    RequestResult,
    ServeDoc,
    calculate_metrics,
    parse_goodput,
    print_report,
    require_matplotlib,
    result_dict,
    write_json,
    write_plots,
)
from pdlaunch.config.rules.host import make_output_dir
from pdlaunch.errors import PdlaunchError

# Token ids below this are left out: byte-level and sentencepiece vocabularies keep control and
# special tokens there.
MIN_TOKEN_ID = 10
_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there one all we their can has been if more when will would who "
    "so no time about many then them these some could other two into first like new only year"
).split()
# Upper bounds of the workload flags: lengths and token ids are drawn as numpy int64s, and every prompt is held in
# memory before the run starts.
MAX_PROMPTS = 1_000_000  # requests (or conversations, turns) of one run
MAX_TOKENS = 2**24  # tokens of one prompt or answer: more than any server's context window
MAX_VOCAB = 2**31


class ServeBenchConfig(BaseModel):
    """Everything one `bench serve` run needs; built from the CLI flags."""

    base_url: str
    endpoint: str = "/v1/completions"
    model: str | None = None  # None: the first id from GET /v1/models
    num_prompts: int = Field(1000, ge=1, le=MAX_PROMPTS)
    random_input_len: int = Field(1024, ge=1, le=MAX_TOKENS)
    # --input-lens: a mixed workload, each prompt one of these lengths, in equal shares (replaces random_input_len)
    input_lens: list[Annotated[int, Field(ge=1, le=MAX_TOKENS)]] | None = Field(None, min_length=1)
    random_output_len: int = Field(128, ge=1, le=MAX_TOKENS)
    random_range_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    request_rate: float = Field(math.inf, gt=0.0)  # req/s; inf sends everything at once
    burstiness: float = Field(1.0, gt=0.0)  # gamma shape; 1 = Poisson, < 1 burstier, > 1 more regular
    max_concurrency: int | None = Field(None, ge=1)
    num_warmups: int = Field(0, ge=0, le=MAX_PROMPTS)
    goodput: list[str] = []
    prompt_format: Literal["ids", "words"] | None = None  # None: ids for completions, words for chat
    vocab_size: int = Field(500, gt=MIN_TOKEN_ID, le=MAX_VOCAB)  # ids drawn from [MIN_TOKEN_ID, vocab_size)
    ignore_eos: bool = True
    seed: int = Field(0, ge=0)  # numpy seeds are non-negative
    request_timeout: float = Field(600.0, gt=0.0)  # s, per request
    save_result: bool = False
    result_dir: Path = Path(".")
    result_filename: str | None = None
    plot_dir: Path | None = None
    # --multi-turn (multi_turn.py): conversations x turns instead of num_prompts independent prompts
    multi_turn: bool = False
    num_conversations: int = Field(8, ge=1, le=MAX_PROMPTS)
    num_turns: int = Field(4, ge=1, le=MAX_PROMPTS)
    system_prompt_len: int = Field(256, ge=0, le=MAX_TOKENS)  # the prompt every conversation starts with

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        """An http(s)://HOST[:PORT] URL, said as a --base-url error rather than as httpx's traceback."""
        fix = "give the server's root as http://HOST:PORT, e.g. http://127.0.0.1:8000"
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise ValueError(f"{url!r} is not a valid URL ({exc}); {fix}") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"{url!r} is not an http:// or https:// URL with a host; {fix}")
        if parsed.port is not None and not 0 < parsed.port < 65536:
            raise ValueError(f"{url!r}: port {parsed.port} is not in 1..65535; {fix}")
        return url

    @field_validator("result_filename")
    @classmethod
    def _file_name(cls, name: str | None) -> str | None:
        if name is not None and not name.strip():
            raise ValueError("the file name is empty; give a name such as result.json, or drop the flag")
        return name

    @model_validator(mode="after")
    def _check(self) -> ServeBenchConfig:
        parse_goodput(self.goodput)
        if self.is_chat and self.prompt_format == "ids":
            raise ValueError("--prompt-format: ids (token-id prompts) need a completions --endpoint, and this one is "
                             "chat; use --prompt-format words for chat")
        # Flags of one mode that the other does not read: refused rather than ignored.
        other_mode = _INDEPENDENT_ONLY if self.multi_turn else _MULTI_TURN_ONLY
        defaults = type(self).model_fields
        ignored = [flag for name, flag in other_mode.items() if getattr(self, name) != defaults[name].default]
        if self.multi_turn and not self.is_chat and self.prompt_format == "words":
            ignored.append("--prompt-format words (multi-turn completions resend the server's token ids)")
        if ignored:
            raise ValueError(f"{', '.join(ignored)}: not used {'with' if self.multi_turn else 'without'} --multi-turn")
        if self.input_lens is not None:
            if self.random_input_len != defaults["random_input_len"].default:
                raise ValueError("--random-input-len and --input-lens both set the prompt lengths: give one")
            if self.random_range_ratio:
                raise ValueError("--random-range-ratio varies the lengths around --random-input-len; --input-lens "
                                 "fixes each prompt's length: drop one")
        return self

    @property
    def is_chat(self) -> bool:
        return self.endpoint.rstrip("/").endswith("chat/completions")

    @property
    def url(self) -> str:
        base = self.base_url.rstrip("/")
        path = "/" + self.endpoint.lstrip("/")
        if base.endswith("/v1") and path.startswith("/v1/"):
            path = path[3:]
        return base + path

    @property
    def models_url(self) -> str:
        base = self.base_url.rstrip("/")
        return base + ("/models" if base.endswith("/v1") else "/v1/models")


# Flags only one mode reads (field -> flag): `--multi-turn` runs conversations, not independent prompts.
_INDEPENDENT_ONLY = {"num_prompts": "--num-prompts", "random_range_ratio": "--random-range-ratio",
                     "input_lens": "--input-lens",
                     "max_concurrency": "--max-concurrency", "num_warmups": "--num-warmups", "plot_dir": "--plot"}
_MULTI_TURN_ONLY = {"num_conversations": "--num-conversations", "num_turns": "--num-turns",
                    "system_prompt_len": "--system-prompt-len"}


# finish_reason of a request the server gave up on (pdlaunch's engine, vLLM): its answer is not whole
CUT_SHORT = frozenset({"abort", "error"})
OnChoice = Callable[[Mapping[str, object]], None]  # sees every streamed choice (multi_turn.py keeps the answers)


@dataclass
class BenchRequest:
    prompt: list[int] | str
    prompt_len: int  # tokens for id prompts, words for word prompts
    output_len: int
    messages: list[dict[str, str]] | None = None  # chat: the whole conversation (multi_turn.py), not `prompt`
    return_token_ids: bool = False  # ask for the output's token ids (multi_turn.py)


def _lengths(mean: int, ratio: float, n: int, rng: np.random.Generator) -> np.ndarray:
    low = max(1, math.floor(mean * (1 - ratio)))
    high = max(low, math.ceil(mean * (1 + ratio)))
    return rng.integers(low, high + 1, size=n)


def sample_requests(cfg: ServeBenchConfig, n: int, rng: np.random.Generator) -> list[BenchRequest]:
    """`n` prompts with input/output lengths uniform in mean * [1 - ratio, 1 + ratio], or with `input_lens`: each
    length of the list for an equal share of the prompts (the first ones one more where n is not a multiple), in a
    seeded random order."""
    fmt = cfg.prompt_format or ("words" if cfg.is_chat else "ids")
    if cfg.input_lens is not None:
        in_lens = rng.permutation(np.resize(np.array(cfg.input_lens), n))
    else:
        in_lens = _lengths(cfg.random_input_len, cfg.random_range_ratio, n, rng)
    out_lens = _lengths(cfg.random_output_len, cfg.random_range_ratio, n, rng)
    requests = []
    for in_len, out_len in zip(in_lens.tolist(), out_lens.tolist()):
        if fmt == "ids":
            prompt: list[int] | str = rng.integers(MIN_TOKEN_ID, cfg.vocab_size, size=in_len).tolist()
        else:
            prompt = " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), size=in_len).tolist())
        requests.append(BenchRequest(prompt=prompt, prompt_len=in_len, output_len=out_len))
    return requests


def arrival_times(n: int, request_rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Send offsets (s) of `n` requests: the first at 0, then gamma(burstiness, 1/(rate*burstiness))
    gaps, whose mean is 1/rate and coefficient of variation 1/sqrt(burstiness)."""
    if math.isinf(request_rate):
        return np.zeros(n)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


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
    or failed, and a stream that ended before [DONE] (cut short: its tokens are not the whole answer)."""
    chunks = 0
    last = st
    done = False
    async with client.stream("POST", cfg.url, json=_payload(cfg, model, req)) as resp:
        if resp.status_code != 200:
            body = (await resp.aread()).decode(errors="replace")
            result.error = f"HTTP {resp.status_code}: {body[:300]}"
            return chunks
        async for line in resp.aiter_lines():
            line = line.strip()
            if not line.startswith("data:"):
                continue
            data_str = line[len("data:"):].strip()
            if data_str == "[DONE]":
                done = True
                break
            data = json.loads(data_str)
            if not isinstance(data, dict):
                result.error = f"a stream chunk is not a JSON object: {data_str[:300]}"
                return chunks
            if data.get("error"):
                result.error = f"server error in stream: {str(data['error'])[:300]}"
                return chunks
            if data.get("choices"):
                choices = [c for c in data["choices"] if isinstance(c, dict)] \
                    if isinstance(data["choices"], list) else []
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
                result.output_len = int(usage.get("completion_tokens") or 0)
                result.prompt_len = int(usage.get("prompt_tokens") or req.prompt_len)
    if not done:
        result.error = f"the stream ended before [DONE] after {chunks} chunk(s): the answer was cut short"
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
        result.output_len = chunks  # server sent no usage: one token per chunk
    return result


async def resolve_model(client: httpx.AsyncClient, cfg: ServeBenchConfig) -> str:
    """Check the server answers, and pick the model: --model, else the first of GET /v1/models."""
    try:
        resp = await client.get(cfg.models_url, timeout=30.0)
    except httpx.ConnectError:
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
    if cfg.model:
        return cfg.model
    try:
        listing = resp.json() if resp.status_code == 200 else {}
    except ValueError:
        listing = {}
    models = listing.get("data") if isinstance(listing, dict) else None
    first = models[0] if isinstance(models, list) and models else None
    if not isinstance(first, dict) or not first.get("id"):
        raise PdlaunchError(
            f"{cfg.models_url} answered HTTP {resp.status_code} without a model list", field="--model",
            hint="pass --model NAME",
        )
    return str(first["id"])


async def _run_requests(client: httpx.AsyncClient, cfg: ServeBenchConfig, model: str, requests: list[BenchRequest],
                        arrivals: np.ndarray, progress: Progress | None) -> tuple[list[RequestResult], float]:
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    task_id = progress.add_task("requests", total=len(requests)) if progress else None
    start = time.perf_counter()

    async def one(req: BenchRequest) -> RequestResult:
        if sem is None:
            res = await send_request(client, cfg, model, req, start)
        else:
            async with sem:
                res = await send_request(client, cfg, model, req, start)
        if progress is not None and task_id is not None:
            progress.advance(task_id)
        return res

    tasks = []
    for req, at in zip(requests, arrivals.tolist()):
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(req)))
    results = list(await asyncio.gather(*tasks))
    return results, time.perf_counter() - start


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """The timed run without the garbage collector's walks over what this process held before it: a full
    collection of a `bench compare` process's ~74k objects took ~30 ms on a 2-core CI host, and every stream's next
    token would read that much later (the instances and the proxy freeze theirs for the same reason,
    memory/heap.py). What the run itself creates is still collected. A process that froze its heap already (an
    engine built in it) keeps it frozen; otherwise the heap is walked again after the run."""
    frozen_before = gc.get_freeze_count()
    gc.freeze()
    try:
        yield
    finally:
        if not frozen_before:
            gc.unfreeze()


async def _bench(cfg: ServeBenchConfig, console: Console) -> tuple[list[RequestResult], float, str]:
    limits = httpx.Limits(max_connections=cfg.max_concurrency, max_keepalive_connections=cfg.max_concurrency)
    timeout = httpx.Timeout(cfg.request_timeout, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        model = await resolve_model(client, cfg)  # before the workload is drawn: a wrong --base-url fails at once
        rng = np.random.default_rng(cfg.seed)
        requests = sample_requests(cfg, cfg.num_prompts, rng)
        arrivals = arrival_times(cfg.num_prompts, cfg.request_rate, cfg.burstiness, rng)
        if cfg.num_warmups:
            console.print(f"Warming up with {cfg.num_warmups} request(s) ...")
            warm = sample_requests(cfg, cfg.num_warmups, rng)
            warm_results, _ = await _run_requests(client, cfg, model, warm, np.zeros(len(warm)), None)
            if not any(r.success for r in warm_results):
                raise PdlaunchError(f"every warmup request failed; first error: {warm_results[0].error}",
                                    hint="check --model, --endpoint and the server log")
        rate = "inf" if math.isinf(cfg.request_rate) else f"{cfg.request_rate:g}"
        console.print(f"{cfg.num_prompts} requests to {escape(cfg.url)} (model {escape(model)}), rate {rate} req/s, "
                      f"burstiness {cfg.burstiness:g}, max concurrency {cfg.max_concurrency or 'none'}")
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as progress, frozen_heap():
            results, duration = await _run_requests(client, cfg, model, requests, arrivals, progress)
    return results, duration, model


def measure(cfg: ServeBenchConfig, console: Console) -> tuple[BenchMetrics, list[RequestResult], ServeDoc]:
    """Run the workload of `cfg` once; returns the metrics, per-request results and the JSON document.
    Prints only the progress line; a run where every request failed is returned, not raised."""
    goodput_ms = parse_goodput(cfg.goodput)
    results, duration, model = asyncio.run(_bench(cfg, console))
    metrics = calculate_metrics(results, duration, goodput_ms)
    run_info: ServeDoc = {
        "backend": "openai-chat" if cfg.is_chat else "openai",
        "base_url": cfg.base_url,
        "endpoint": cfg.endpoint,
        "model_id": model,
        "num_prompts": cfg.num_prompts,
        "random_input_len": cfg.random_input_len,
        "input_len_mix": [*cfg.input_lens] if cfg.input_lens is not None else None,
        "random_output_len": cfg.random_output_len,
        "random_range_ratio": cfg.random_range_ratio,
        "request_rate": "inf" if math.isinf(cfg.request_rate) else cfg.request_rate,
        "burstiness": cfg.burstiness,
        "max_concurrency": cfg.max_concurrency,
        "seed": cfg.seed,
        "goodput_slos_ms": {name: limit for name, limit in goodput_ms.items()},
    }
    return metrics, results, result_dict(metrics, results, run_info)


def prepare_outputs(cfg: ServeBenchConfig) -> None:
    """The result file's folder and the plot folder, created before the run: a path that cannot be written fails
    now, naming its flag, not once the run is over."""
    if cfg.save_result or cfg.result_filename:
        name = Path(cfg.result_filename or "result.json")
        flag = "--result-filename" if name.parent != Path(".") else "--result-dir"
        path = cfg.result_dir / name
        make_output_dir(path.parent, flag)
        if path.is_dir():
            raise PdlaunchError(f"{str(path)!r} is a folder", field="--result-filename",
                                hint="give the JSON file's name, e.g. result.json")
    if cfg.plot_dir is not None:
        make_output_dir(cfg.plot_dir, "--plot")


def save_result(cfg: ServeBenchConfig, doc: ServeDoc, path: Path) -> None:
    """Write the result JSON; an OSError (disk full, no permission) as an error naming the flag and the path. It comes
    after the report was printed, so the figures are on screen."""
    try:
        write_json(doc, path)
    except OSError as exc:
        flag = "--result-filename" if cfg.result_filename else "--result-dir"
        raise PdlaunchError(f"could not write the results to {str(path)!r}: {exc.strerror or exc}", field=flag,
                            hint="the report above has the figures; free space or give a path you can write") from None


def run_serve_bench(cfg: ServeBenchConfig, console: Console | None = None) -> ServeDoc:
    """Run the benchmark, print the report, save JSON/plots if asked; returns the JSON document."""
    console = console or Console()
    if cfg.plot_dir is not None:
        require_matplotlib()  # fail before the run, not after it
    prepare_outputs(cfg)
    metrics, results, doc = measure(cfg, console)
    print_report(console, metrics, results, parse_goodput(cfg.goodput))
    model = str(doc["model_id"])
    if cfg.save_result or cfg.result_filename:
        default_name = f"pdlaunch-{doc['request_rate']}qps-{model.replace('/', '_')}-{doc['date']}.json"
        name = cfg.result_filename or default_name
        path = cfg.result_dir / name
        save_result(cfg, doc, path)
        console.print(f"Saved results to {path}", markup=False)
    if cfg.plot_dir is not None and metrics.completed:
        for path in write_plots(results, cfg.plot_dir):
            console.print(f"Wrote {path}", markup=False)
    if not metrics.completed:
        raise PdlaunchError(f"all {cfg.num_prompts} requests failed; first error: {results[0].error}",
                            hint="check --base-url, --endpoint, --model and the server log")
    return doc
