"""The sizes every config.json gives (hidden size, layers, heads, KV heads, head_dim, MLP width, vocabulary), read once
for check-config (config/model_info.py) and the loader (model/arch.py), so both refuse the same values in the same
words: "config.json: num_attention_heads is 0, not a positive integer; use the checkpoint's original config.json".

The loader read them with int(): `num_attention_heads: 0` was a ZeroDivisionError (hidden_size // heads) wherever
check-config had not run first (`LLM(...)`, an instance started on its own), a negative size a model of negative
shapes, `"16"` and `64.5` were taken as 16 and 64. Torch-free: config/model_info.py reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.families import FamilyDefaults

REQUIRED_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
FIX = "use the checkpoint's original config.json"
# The largest value each size may hold. Layers: the loader builds per-layer lists (attention types, MoE layers) and
# check-config counts parameters layer by layer, so 10**20 layers was an OverflowError traceback and 10**9 a list of
# a billion entries; the deepest open checkpoints have ~130. Any other size: a tensor dimension, which torch's and
# our kernels' indexing keeps within a 32-bit signed integer.
MAX_LAYERS = 4096
MAX_SIZE = 2**31 - 1


class ConfigSizes(NamedTuple):
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    num_key_value_heads: int
    head_dim: int


def positive_int(value: object, ceiling: int | None = MAX_SIZE) -> int | None:
    """`value` when it is a JSON integer above 0 and at most `ceiling` (None: any) (not a bool, a float or a
    string), else None."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        return None
    return value if ceiling is None or value <= ceiling else None


def _ceiling(key: str) -> int:
    return MAX_LAYERS if key == "num_hidden_layers" else MAX_SIZE


def config_sizes(cfg: Mapping[str, object], defaults: FamilyDefaults, source: str = "config.json") -> ConfigSizes:
    """The sizes of `cfg`, a key it omits read as transformers' class of its architecture reads it (`defaults`;
    num_key_value_heads null: as many as the heads; head_dim absent, null or 0: hidden_size // num_attention_heads).
    PdlaunchError (field `model.path`, as check-config names it) naming every size that is not a positive integer
    and what it holds; `source` names the file."""
    required = {key: positive_int(cfg.get(key), _ceiling(key)) for key in REQUIRED_SIZES}
    bad = [key for key, value in required.items() if value is None]
    if bad:
        raise _not_positive(cfg, bad, source)
    size = {key: value for key, value in required.items() if value is not None}
    heads = size["num_attention_heads"]
    written = {"num_key_value_heads": cfg["num_key_value_heads"] if "num_key_value_heads" in cfg
               else defaults.num_key_value_heads or heads,
               "head_dim": cfg.get("head_dim") or defaults.head_dim or size["hidden_size"] // heads}
    if written["num_key_value_heads"] is None:
        written["num_key_value_heads"] = heads
    kv_heads, head_dim = positive_int(written["num_key_value_heads"]), positive_int(written["head_dim"])
    if kv_heads is None or head_dim is None:
        raise _not_positive({**cfg, **written}, [key for key, value in written.items() if positive_int(value) is None],
                            source)
    return ConfigSizes(**size, num_key_value_heads=kv_heads, head_dim=head_dim)


def _not_positive(values: Mapping[str, object], keys: list[str], source: str) -> PdlaunchError:
    """The error naming `keys` with what each holds: `lacks hidden_size; num_attention_heads is '4', not a positive
    integer; num_hidden_layers is 100000, more than 4096`."""
    missing = [key for key in keys if values.get(key) is None]
    too_large = [key for key in keys if positive_int(values.get(key), None) is not None]
    wrong = [f"{key} is {values[key]!r}" for key in keys if values.get(key) is not None and key not in too_large]
    parts = [f"lacks {', '.join(missing)}"] if missing else []
    if wrong:
        parts.append(f"{', '.join(wrong)}, not {'a positive integer' if len(wrong) == 1 else 'positive integers'}")
    parts += [f"{key} is {values[key]}, more than {_ceiling(key)}" for key in too_large]
    return PdlaunchError(f"{source}: {'; '.join(parts)}", field="model.path", hint=FIX)
