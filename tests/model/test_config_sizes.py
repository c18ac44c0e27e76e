"""A config.json size that is zero, negative or not a JSON integer is refused in check-config's words on every path
(model/config_sizes.py). The loader read the sizes with int(): `num_attention_heads: 0` without a head_dim was a
ZeroDivisionError where check-config had not run first (`LLM(...)`, an instance started on its own), a negative size
built a model of negative shapes, `"8"` and `128.5` were read as 8 and 128."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdlaunch.config.model_info import load_model_info
from pdlaunch.errors import PdlaunchError
from pdlaunch.model.arch import load_arch
from tests.config.cli_helpers import invoke, write_model

FIX = "use the checkpoint's original config.json"


def _model_with(root: Path, **changes: object) -> Path:
    """A complete checkpoint, then config.json changed (None: the key removed)."""
    model = write_model(root)
    hf = json.loads((model / "config.json").read_text())
    hf.update(changes)
    (model / "config.json").write_text(json.dumps({k: v for k, v in hf.items() if v is not None}))
    return model


@pytest.mark.parametrize("command", ["generate", "check-config"])
def test_zero_attention_heads_is_named_by_generate_and_check_config(tmp_path: Path, command: str) -> None:
    model = _model_with(tmp_path, num_attention_heads=0, head_dim=None)
    extra = ["--prompt", "hi", "--max-tokens", "1"] if command == "generate" else []
    result = invoke([command, str(model), "--device", "cpu", *extra])  # no traceback (invoke asserts it)
    assert result.exit_code == 1, result.output
    said = " ".join(result.output.split())
    assert f"{model / 'config.json'}: num_attention_heads is 0, not a positive integer" in said, said
    assert FIX in said


def test_zero_attention_heads_is_named_where_check_config_does_not_run(tmp_path: Path) -> None:
    """`LLM(...)` opens the checkpoint as an instance's engine does, with no check-config before it."""
    from pdlaunch.engine.llm import LLM

    model = _model_with(tmp_path, num_attention_heads=0, head_dim=None)
    with pytest.raises(PdlaunchError) as refused:
        LLM(str(model), device="cpu")
    assert refused.value.field == "model.path" and refused.value.hint == FIX
    assert refused.value.message == f"{model / 'config.json'}: num_attention_heads is 0, not a positive integer"


@pytest.mark.parametrize(("changes", "said"), [
    ({"num_attention_heads": -8}, "num_attention_heads is -8, not a positive integer"),
    ({"hidden_size": 0, "num_hidden_layers": -1}, "hidden_size is 0, num_hidden_layers is -1, not positive integers"),
    ({"intermediate_size": 0, "vocab_size": None}, "lacks vocab_size; intermediate_size is 0, not a positive integer"),
    ({"num_attention_heads": "8"}, "num_attention_heads is '8', not a positive integer"),
    ({"hidden_size": 128.5}, "hidden_size is 128.5, not a positive integer"),
    ({"num_key_value_heads": 0}, "num_key_value_heads is 0, not a positive integer"),  # check-config took it as absent
    ({"head_dim": -16}, "head_dim is -16, not a positive integer"),
    ({"hidden_size": 4, "head_dim": None}, "head_dim is 0, not a positive integer"),  # 4 // 8 heads
    # a per-layer list of 10**20 entries was an OverflowError traceback, of 10**9 a list of a billion entries
    ({"num_hidden_layers": 10**20}, f"num_hidden_layers is {10**20}, more than 4096"),
    ({"num_hidden_layers": 10**9, "hidden_size": 0},
     "hidden_size is 0, not a positive integer; num_hidden_layers is 1000000000, more than 4096"),
    ({"vocab_size": 2**31}, "vocab_size is 2147483648, more than 2147483647"),
    ({"head_dim": 2**40}, "head_dim is 1099511627776, more than 2147483647"),
])
def test_the_loader_and_check_config_refuse_a_size_in_the_same_words(tmp_path: Path, changes: dict[str, object],
                                                                      said: str) -> None:
    model = _model_with(tmp_path, **changes)
    with pytest.raises(PdlaunchError) as refused:
        load_arch(model)
    assert refused.value.message == f"{model / 'config.json'}: {said}"
    assert refused.value.field == "model.path" and refused.value.hint == FIX
    info, problems = load_model_info(str(model))
    assert info is None and problems == [("model.path", f"{refused.value.message}; {FIX}")]


def test_sizes_read_as_transformers_reads_what_config_json_leaves_out(tmp_path: Path) -> None:
    arch = load_arch(_model_with(tmp_path, num_key_value_heads=None, head_dim=0))
    assert (arch.num_kv_heads, arch.head_dim) == (arch.num_heads, arch.hidden_size // arch.num_heads)
