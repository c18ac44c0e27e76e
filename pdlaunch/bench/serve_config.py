"""The settings of one `pdlaunch bench serve` run (every flag, checked before anything is sent) and the bounds of
its workload flags."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

import httpx
from pydantic import BaseModel, Field, field_validator, model_validator

from pdlaunch.bench.flag_numbers import flag
from pdlaunch.bench.report import parse_goodput
from pdlaunch.config.launcher_config import unsendable_key, unsendable_text

# Token ids below this are left out: byte-level and sentencepiece vocabularies keep control and
# special tokens there.
MIN_TOKEN_ID = 10
# Upper bounds of the workload flags: lengths and token ids are drawn as numpy int64s, and every independent prompt
# is held in memory before the run starts.
MAX_PROMPTS = 1_000_000  # requests (or conversations, turns) of one run
MAX_TOKENS = 2**24  # tokens of one prompt or answer: more than any server's context window
MAX_VOCAB = 2**31
BURSTINESS = "a positive gamma shape: 1 Poisson, < 1 burstier, > 1 more regular"
SECONDS = "a positive number of seconds, e.g. 600"
TOKENS = f"a number of tokens from 1 to {MAX_TOKENS}"
SEED = "a seed of 0 or more, e.g. 0"
VOCAB = (f"the vocabulary size prompt token ids are drawn below, {MIN_TOKEN_ID + 1} to {MAX_VOCAB}, e.g. 500 (the "
         "model's for a real tokenizer)")


class ServeBenchConfig(BaseModel):
    """Everything one `bench serve` run needs; built from the CLI flags."""

    base_url: str
    # `Authorization: Bearer` of a deployment served with --api-key; never written to the result file
    api_key: str | None = Field(None, repr=False)
    endpoint: str = "/v1/completions"
    model: str | None = None  # None: the first id from GET /v1/models
    num_prompts: Annotated[int, flag(f"a number of requests from 1 to {MAX_PROMPTS}, e.g. 1000")] = Field(
        1000, ge=1, le=MAX_PROMPTS)
    random_input_len: Annotated[int, flag(f"{TOKENS}, e.g. 1024")] = Field(1024, ge=1, le=MAX_TOKENS)
    # --input-lens: a mixed workload, each prompt one of these lengths, in equal shares (replaces random_input_len)
    input_lens: list[Annotated[int, Field(ge=1, le=MAX_TOKENS), flag(
        f"prompt lengths from 1 to {MAX_TOKENS} tokens, e.g. 64,3072")]] | None = Field(None, min_length=1)
    random_output_len: Annotated[int, flag(f"{TOKENS}, e.g. 128")] = Field(128, ge=1, le=MAX_TOKENS)
    random_range_ratio: Annotated[float, flag("a ratio from 0 up to (not including) 1, e.g. 0.5")] = Field(
        0.0, ge=0.0, lt=1.0)
    # req/s; inf sends everything at once
    request_rate: Annotated[float, flag("a positive number of requests/s, or inf to send all at once",
                                          allow_inf=True)] = Field(math.inf, gt=0.0)
    # gamma shape; 1 = Poisson, < 1 burstier, > 1 more regular
    burstiness: Annotated[float, flag(BURSTINESS)] = Field(1.0, gt=0.0)
    max_concurrency: Annotated[int | None, flag("a positive number of requests in flight, or drop the flag")] = Field(
        None, ge=1)
    num_warmups: Annotated[int, flag(f"a number of requests from 0 to {MAX_PROMPTS}, e.g. 2")] = Field(
        0, ge=0, le=MAX_PROMPTS)
    goodput: list[str] = []
    # None: ids for completions, words for chat
    prompt_format: Annotated[Literal["ids", "words"] | None, flag(
        "ids (token ids, for /v1/completions) or words (for either endpoint), or drop the flag")] = None
    # ids drawn from [MIN_TOKEN_ID, vocab_size)
    vocab_size: Annotated[int, flag(VOCAB)] = Field(500, gt=MIN_TOKEN_ID, le=MAX_VOCAB)
    ignore_eos: bool = True
    seed: Annotated[int, flag(SEED)] = Field(0, ge=0)  # numpy seeds are non-negative
    request_timeout: Annotated[float, flag(SECONDS)] = Field(600.0, gt=0.0)  # s, per request
    save_result: bool = False
    result_dir: Path = Path(".")
    result_filename: str | None = None
    plot_dir: Path | None = None
    # --multi-turn (multi_turn.py): conversations x turns instead of num_prompts independent prompts
    multi_turn: bool = False
    num_conversations: Annotated[int, flag(f"a positive number of conversations up to {MAX_PROMPTS}, e.g. 8")] = Field(
        8, ge=1, le=MAX_PROMPTS)
    num_turns: Annotated[int, flag(f"a positive number of turns up to {MAX_PROMPTS}, e.g. 4")] = Field(
        4, ge=1, le=MAX_PROMPTS)
    # the prompt every conversation starts with
    system_prompt_len: Annotated[int, flag(f"a number of tokens from 0 to {MAX_TOKENS}, e.g. 256")] = Field(
        256, ge=0, le=MAX_TOKENS)
    # Each conversation's last answer, which no later turn resends (None: random_output_len like the others).
    last_answer_len: Annotated[int | None, flag(f"{TOKENS}, or drop the flag")] = Field(None, ge=1, le=MAX_TOKENS)

    @field_validator("api_key")
    @classmethod
    def _sendable_key(cls, value: str | None) -> str | None:
        """A key httpx cannot put in a header was reported as the server's fault (`--base-url: ... gave no HTTP
        answer (LocalProtocolError: Illegal header value ...)`)."""
        what = None if value is None else unsendable_key(value)
        if what is not None:
            raise ValueError(f"{unsendable_text(what)}; remove it (the deployment's key has none)")
        return value

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

    @field_validator("endpoint")
    @classmethod
    def _endpoint_path(cls, endpoint: str) -> str:
        """A path under --base-url ending in completions: "" or a whole URL was sent to the server's root or to
        `BASE/http://...`, and failed later as every request's error without naming this flag. Returned as the path
        it was checked as (one leading slash, no blanks, no trailing slash): sent as typed, `/v1/completions/` had
        every request answered with a redirect the client does not follow (`HTTP 307: `), and ` /v1/completions`
        with a 404."""
        path = endpoint.strip().strip("/")
        if "://" in path or not path.endswith("completions"):
            raise ValueError(f"{endpoint!r} is not an OpenAI completions path; give /v1/completions or "
                             "/v1/chat/completions (the server's address goes in --base-url)")
        return "/" + path

    @field_validator("model")
    @classmethod
    def _model_name(cls, model: str | None) -> str | None:
        if model is not None and not model.strip():  # `--model "$MODEL"` with MODEL unset
            raise ValueError("is empty (an unset variable?); give the served model's name, or drop the flag to "
                             "use the first of the server's /v1/models")
        return model

    @field_validator("result_filename")
    @classmethod
    def _file_name(cls, name: str | None) -> str | None:
        if name is not None and not name.strip():
            raise ValueError("the file name is empty; give a name such as result.json, or drop the flag")
        # Joined to --result-dir as vLLM's bench joins them: a sub-folder stays under it, an absolute path replaces
        # it. A relative name that climbs out (`../../x`) wrote outside the folder the run was told to use.
        if name is not None and not Path(name).is_absolute() and ".." in Path(name).parts:
            raise ValueError(f"{name!r} climbs out of --result-dir with '..'; give a file name (or sub/NAME.json) "
                             "under --result-dir and set --result-dir to the folder, or give an absolute path")
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
        if self.multi_turn and self.num_conversations * self.num_turns > MAX_PROMPTS:
            raise ValueError(f"--num-conversations {self.num_conversations} x --num-turns {self.num_turns} is "
                             f"{self.num_conversations * self.num_turns} requests, more than {MAX_PROMPTS}; give fewer "
                             "conversations or turns")
        if ignored:
            raise ValueError(f"{', '.join(ignored)}: not used {'with' if self.multi_turn else 'without'} --multi-turn")
        count = self.num_conversations if self.multi_turn else self.num_prompts
        if not math.isinf(self.request_rate) and not math.isfinite(count / self.request_rate / self.burstiness):
            # the gamma gaps' scale (workload.arrival_times) or their sum is past any float: a ZeroDivisionError or a
            # run that waits for ever
            raise ValueError(f"--request-rate: {self.request_rate:g} requests/s with --burstiness {self.burstiness:g} "
                             "spaces the arrivals further apart than any clock counts; give a larger --request-rate "
                             "or --burstiness")
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

    def answer_len(self, turn: int) -> int:
        """--multi-turn: the tokens asked for turn `turn`'s answer (0-based): --last-answer-len for the last turn
        when given, --random-output-len otherwise."""
        last = turn == self.num_turns - 1
        return self.last_answer_len if last and self.last_answer_len is not None else self.random_output_len

    @property
    def answers_len(self) -> int:
        """--multi-turn: the answer tokens a conversation holds by its end (every turn's answer)."""
        return sum(self.answer_len(turn) for turn in range(self.num_turns))

    @property
    def url(self) -> str:
        base = self.base_url.rstrip("/")
        path = "/" + self.endpoint.lstrip("/")
        if base.endswith("/v1") and path.startswith("/v1/"):
            path = path[3:]
        return base + path

    @property
    def headers(self) -> dict[bytes, bytes]:
        """Sent with every request (the model list, the prompts, multi-turn's /metrics reads). As bytes, the key in
        UTF-8 (as curl sends one typed in a UTF-8 terminal, and as pdlaunch's auth reads it): httpx encodes a str
        header as ASCII only, and a key beyond it ended the run in a UnicodeEncodeError that quoted the key."""
        return {b"Authorization": b"Bearer " + self.api_key.encode()} if self.api_key else {}

    @property
    def models_url(self) -> str:
        base = self.base_url.rstrip("/")
        return base + ("/models" if base.endswith("/v1") else "/v1/models")


# Flags only one mode reads (field -> flag): `--multi-turn` runs conversations, not independent prompts.
_INDEPENDENT_ONLY = {"num_prompts": "--num-prompts", "random_range_ratio": "--random-range-ratio",
                     "input_lens": "--input-lens",
                     "max_concurrency": "--max-concurrency", "num_warmups": "--num-warmups", "plot_dir": "--plot"}
_MULTI_TURN_ONLY = {"num_conversations": "--num-conversations", "num_turns": "--num-turns",
                    "system_prompt_len": "--system-prompt-len", "last_answer_len": "--last-answer-len"}
