"""A BOS id from generation_config.json past config.json's vocab_size, put before every prompt by add_bos_token:
check-config called the checkpoint valid, then the engine refused every request ("token ids must lie in ...")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.config.cli_helpers import check, invoke
from tests.helpers.checkpoints import make_llama


def _bos_from_generation_config(model: Path, bos: int) -> None:
    tok_cfg = json.loads((model / "tokenizer_config.json").read_text())
    tok_cfg.pop("bos_token", None)
    tok_cfg["add_bos_token"] = True
    (model / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    gen_cfg = json.loads((model / "generation_config.json").read_text())
    gen_cfg["bos_token_id"] = bos
    (model / "generation_config.json").write_text(json.dumps(gen_cfg))


@pytest.mark.parametrize("command", ["check-config", "generate"])
def test_a_bos_id_past_the_vocab_is_a_model_error(tmp_path: Path, command: str) -> None:
    model = make_llama(tmp_path / "llama")
    _bos_from_generation_config(model, 99999)
    extra = ["--prompt", "hi", "--max-tokens", "1"] if command == "generate" else []
    result = invoke([command, str(model), "--device", "cpu", *extra])
    assert result.exit_code == 1, result.output
    assert "BOS token id 99999 (generation_config.json:bos_token_id)" in result.output, result.output


def test_a_bos_id_inside_the_vocab_is_valid(tmp_path: Path) -> None:
    model = make_llama(tmp_path / "llama")
    _bos_from_generation_config(model, 511)
    result = check([str(model), "--device", "cpu"])
    assert result.exit_code == 0, result.output
