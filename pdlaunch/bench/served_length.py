"""Whether a `bench serve` workload fits the model it is sent to: its longest request (prompt and output) against
the max_model_len that GET /v1/models lists for the model (pdlaunch's and vLLM's servers list it). A workload past
it had every such request refused with a 400 once the run was under way, and the report's hint pointed at
--base-url and --model instead of the length flags; the defaults (1024 + 128 tokens) are past the CPU example's
max_model_len of 1024."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdlaunch.bench.serve_config import ServeBenchConfig
from pdlaunch.bench.workload import length_range
from pdlaunch.errors import PdlaunchError


@dataclass(frozen=True)
class ServedModel:
    """The model a run sends to, and the max_model_len the server lists for it (None: it lists none)."""

    name: str
    max_model_len: int | None = None


def listed_max_model_len(entry: object) -> int | None:
    """The max_model_len of one /v1/models entry, or None where the server gives no usable one."""
    value = entry.get("max_model_len") if isinstance(entry, dict) else None
    return value if type(value) is int and value > 0 else None


def _longest(mean: int, ratio: float) -> int:
    """The longest length workload.py draws around `mean` (uniform in mean * [1 - ratio, 1 + ratio])."""
    return length_range(mean, ratio)[1]


def _largest_input_len(room: int, ratio: float) -> int:
    """The largest --random-input-len whose longest draw is at most `room` tokens (0: none is)."""
    length = math.floor(room / (1 + ratio)) + 1  # one above: the quotient may sit a rounding error below a fit
    while length > 0 and _longest(length, ratio) > room:
        length -= 1
    return length


def check_fits_served(cfg: ServeBenchConfig, served: ServedModel) -> None:
    """Refuse a workload whose longest request needs more tokens than the served model's max_model_len, naming the
    flags that size it. Word prompts (chat) are counted a token a word: a lower bound, as a word is at least one
    token and the chat template adds more."""
    limit = served.max_model_len
    if limit is None:
        return
    words = (cfg.prompt_format or ("words" if cfg.is_chat else "ids")) == "words"
    at_least = "at least " if words else ""
    where = f"the max_model_len {limit} that {cfg.models_url} lists for '{served.name}'"
    if cfg.multi_turn:
        need = cfg.system_prompt_len + cfg.num_turns * cfg.random_input_len + cfg.answers_len
        if need > limit:
            if cfg.last_answer_len is None:
                sizes = (f"--num-turns {cfg.num_turns} x (--random-input-len {cfg.random_input_len} + "
                         f"--random-output-len {cfg.random_output_len})")
            else:
                sizes = (f"--num-turns {cfg.num_turns} x --random-input-len {cfg.random_input_len} + "
                         f"{cfg.num_turns - 1} x --random-output-len {cfg.random_output_len} + --last-answer-len "
                         f"{cfg.last_answer_len}")
            last = "" if cfg.last_answer_len is None else ", --last-answer-len"
            raise PdlaunchError(
                f"a conversation's last turn needs {at_least}{need} tokens (--system-prompt-len "
                f"{cfg.system_prompt_len} + {sizes}), more than {where}: the server would refuse it with "
                "HTTP 400", field="--num-turns",
                hint=f"lower --num-turns, --random-input-len, --random-output-len{last} or --system-prompt-len")
        return
    ratio = cfg.random_range_ratio
    prompt = max(cfg.input_lens) if cfg.input_lens else _longest(cfg.random_input_len, ratio)
    output = _longest(cfg.random_output_len, ratio)
    if prompt + output <= limit:
        return
    prompt_flag = "--input-lens" if cfg.input_lens else "--random-input-len"
    # 0: the outputs alone leave no room for a prompt, which is --random-output-len's to mend (a negative length read
    # `pass --random-input-len -88 or less`)
    fits = max(0, limit - output if cfg.input_lens else _largest_input_len(limit - output, ratio))
    flag = prompt_flag if fits else "--random-output-len"
    lengths = "lengths of " if cfg.input_lens else ""
    # A word prompt of `fits` words may still be longer in tokens: the hint says so rather than promise a fit.
    bound = (f"below {fits} (a word is a token or more, and a chat template adds its own)" if words
             else f"{fits} or less")
    hint = (f"pass {prompt_flag} {lengths}{bound} with this --random-output-len, or a smaller --random-output-len"
            if fits else "pass a smaller --random-output-len")
    raise PdlaunchError(
        f"prompts of up to {prompt} tokens + outputs of up to {output} (--random-output-len) need {at_least}"
        f"{prompt + output} tokens, more than {where}: the server would refuse each such request with HTTP 400",
        field=flag, hint=hint)
