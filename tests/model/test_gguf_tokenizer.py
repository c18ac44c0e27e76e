"""The tokenizer rebuilt from GGUF metadata splits text the way `tokenizer.ggml.pre` says (Llama 3 groups
digits by three, Qwen2 splits each digit, others keep GPT-2's split): the ids equal those of transformers'
own GGUF tokenizer loader for the same file."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdlaunch.model.gguf.convert import convert_gguf
from pdlaunch.model.tokenizer import Tokenizer
from tests.helpers.checkpoints import make_qwen2
from tests.model.gguf_files import write_gguf

TEXT = "In 2024, 12345 apples cost $6789.50 — isn't it?\n\n  ok"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_qwen2(tmp_path_factory.mktemp("hf") / "qwen2")


@pytest.mark.parametrize(("pre", "count"), [(None, 43), ("smollm", 43), ("llama-bpe", 46), ("qwen2", 47)])
def test_ids_equal_transformers_gguf_tokenizer(hf_dir: Path, tmp_path: Path, pre: str | None, count: int) -> None:
    from transformers import AutoTokenizer

    path = write_gguf(hf_dir, tmp_path / "m.gguf", "qwen2", pre=pre)
    out = tmp_path / "conv"
    out.mkdir()
    convert_gguf(path, out)
    ours = Tokenizer(out).encode(TEXT, add_special_tokens=False)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name).encode(TEXT, add_special_tokens=False)
    assert ours == theirs and len(ours) == count  # the count shows which split ran
