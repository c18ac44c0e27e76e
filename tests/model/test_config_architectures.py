"""config.json's `architectures` that pdlaunch cannot run: the loader (serve, generate) and check-config say the
same thing, naming the file, what it holds and the supported classes. Before, the loader took the first entry
of whatever was there (a string's first letter, a dict's KeyError traceback) and check-config took the first
supported entry of a list, so one passed what the other refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdlaunch.config.model_info import load_model_info
from pdlaunch.errors import PdlaunchError
from pdlaunch.model.arch import load_arch
from pdlaunch.model.families import SUPPORTED_ARCHITECTURES

CONFIG = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
          "vocab_size": 512, "intermediate_size": 128}
ABSENT = object()


def _write(tmp_path: Path, architectures: object) -> Path:
    cfg = dict(CONFIG) if architectures is ABSENT else {**CONFIG, "architectures": architectures}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize("architectures,what", [
    (ABSENT, "has no `architectures` list"),
    (None, "has no `architectures` list"),
    ([], "has an empty `architectures` list"),
    ("LlamaForCausalLM", "has architectures 'LlamaForCausalLM', which is not a list"),
    ({"LlamaForCausalLM": 1}, "has architectures {'LlamaForCausalLM': 1}, which is not a list"),
    (7, "has architectures 7, which is not a list"),
    ([7], "has architectures [7], which holds something other than a class name"),
    (["GPT2LMHeadModel", "LlamaForCausalLM"],
     "has architectures ['GPT2LMHeadModel', 'LlamaForCausalLM']: several model classes"),
    (["LlamaForCausalLM", "LlamaForSequenceClassification"],
     "has architectures ['LlamaForCausalLM', 'LlamaForSequenceClassification']: several model classes"),
    (["GPT2LMHeadModel"], "has architecture 'GPT2LMHeadModel', which pdlaunch cannot run"),
])
def test_loader_and_check_say_what_was_found_where_and_what_runs(tmp_path: Path, architectures: object,
                                                                 what: str) -> None:
    path = _write(tmp_path, architectures)
    config_file = str(path / "config.json")
    with pytest.raises(PdlaunchError) as err:
        load_arch(path)
    assert err.value.field == "config.json:architectures"
    assert err.value.message.startswith(f"{config_file} {what}")
    assert err.value.hint is not None and "supported architectures: " + ", ".join(SUPPORTED_ARCHITECTURES) \
        in err.value.hint
    info, problems = load_model_info(str(path))
    assert info is None and [p.field for p in problems] == ["model.path"]
    assert problems[0].message == f"{err.value.message}; {err.value.hint}"  # check-config's words are the loader's


def test_one_class_listed_twice_is_that_class(tmp_path: Path) -> None:
    path = _write(tmp_path, ["Qwen2ForCausalLM", "Qwen2ForCausalLM"])
    assert load_arch(path).architecture == "Qwen2ForCausalLM"
    info, problems = load_model_info(str(path))
    assert info is not None and info.architecture == "Qwen2ForCausalLM", problems


def test_a_config_json_that_is_not_an_object_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('["LlamaForCausalLM"]')
    with pytest.raises(PdlaunchError) as err:  # was an AttributeError traceback
        load_arch(tmp_path)
    assert err.value.field == "model.path" and "holds a JSON list, not an object" in err.value.message
