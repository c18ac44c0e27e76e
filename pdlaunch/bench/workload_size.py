"""The memory a `bench serve` workload holds, checked before anything is drawn or sent: every independent prompt is
drawn before the run starts (workload.py), and each conversation of `--multi-turn` keeps its history until it ends
(multi_turn.py). A workload larger than the memory this machine has available would otherwise swap or be killed by
the kernel after minutes of drawing, with no word of which flag to lower."""

from __future__ import annotations

from pdlaunch.bench.serve_config import MIN_TOKEN_ID, ServeBenchConfig
from pdlaunch.bench.workload import length_range
from pdlaunch.config.rules.host_memory import available_memory_bytes
from pdlaunch.errors import PdlaunchError

POINTER_BYTES = 8  # a list slot
INT_BYTES = 28  # a Python int object below 2**30
SHARED_INTS = 257  # CPython keeps one int object each for -5..256: an id below it costs only its list slot
# a prompt word and its space, in one str: the word lists of workload.py and multi_turn.py average 4.6 and 6.3 bytes
WORD_BYTES = 4


def bytes_per_token(cfg: ServeBenchConfig) -> float:
    """What one prompt token costs in memory: a word of a word prompt, or an id of a token-id list (ids drawn
    uniformly from [MIN_TOKEN_ID, vocab_size), those below SHARED_INTS sharing their int object)."""
    if (cfg.prompt_format or ("words" if cfg.is_chat else "ids")) == "words":
        return WORD_BYTES
    shared = max(0, min(cfg.vocab_size, SHARED_INTS) - MIN_TOKEN_ID) / (cfg.vocab_size - MIN_TOKEN_ID)
    return POINTER_BYTES + (1 - shared) * INT_BYTES


def tokens_held(cfg: ServeBenchConfig) -> int:
    """Prompt tokens in memory at once: every independent prompt (warmups too) at its longest, or every
    conversation's history at its last turn."""
    if cfg.multi_turn:
        history = cfg.system_prompt_len + cfg.num_turns * cfg.random_input_len + cfg.answers_len
        return cfg.num_conversations * history
    longest = max(cfg.input_lens) if cfg.input_lens else length_range(cfg.random_input_len, cfg.random_range_ratio)[1]
    return (cfg.num_prompts + cfg.num_warmups) * longest


def check_workload_fits(cfg: ServeBenchConfig, count_flag: str | None = None, length_flag: str | None = None) -> None:
    """Refuse a workload whose prompts alone need more than the memory available now, naming the flags that size it
    (`count_flag`, `length_flag`: another command's names for them, e.g. `bench compare`'s --input-len)."""
    available = available_memory_bytes()
    need = tokens_held(cfg) * bytes_per_token(cfg)
    if available is None or need <= available:
        return
    if cfg.multi_turn:
        count = count_flag or "--num-conversations"
        what = (f"{cfg.num_conversations} conversations of {cfg.num_turns} turns hold "
                f"{tokens_held(cfg) // cfg.num_conversations} prompt tokens each by their last turn")
        fix = f"lower {count}, --num-turns or {length_flag or '--random-input-len'}"
    else:
        count = count_flag or "--num-prompts"
        prompts = cfg.num_prompts + cfg.num_warmups
        what = f"{prompts} prompts of up to {tokens_held(cfg) // prompts} tokens, all drawn before the run"
        fix = f"lower {count} or {length_flag or ('--input-lens' if cfg.input_lens else '--random-input-len')}"
    raise PdlaunchError(f"the workload needs about {need / 2**30:.1f} GiB of memory ({what}), more than the "
                        f"{available / 2**30:.1f} GiB available on this machine", field=count, hint=fix)
