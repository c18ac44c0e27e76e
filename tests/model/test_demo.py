"""`--model tiny`: deterministic bytes, atomic build into the cache, tokenizer and chat template."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.checkpoint import load_checkpoint
from pdlaunch.model.demo import DEMO_HF_CONFIG, build_demo_checkpoint, ensure_demo_checkpoint, resolve_model_path
from pdlaunch.model.demo_tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID
from pdlaunch.model.loader import load_model
from pdlaunch.model.tokenizer import Tokenizer
from tests.helpers.checkpoints import hf_greedy
from tests.model.paged_runner import PagedRunner


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_demo_built_twice_is_byte_identical(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    build_demo_checkpoint(tmp_path / "a")
    build_demo_checkpoint(tmp_path / "b")
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert set(a) == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                      "tokenizer_config.json"}
    assert a == b


def test_ensure_demo_builds_once_into_the_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDLAUNCH_CACHE_DIR", str(tmp_path))
    path = ensure_demo_checkpoint()
    assert path == tmp_path / "demo-v1" and (path / "model.safetensors").is_file()
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_checkpoint() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert resolve_model_path("tiny") == path


def test_racing_builders_all_get_one_complete_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDLAUNCH_CACHE_DIR", str(tmp_path))
    barrier = threading.Barrier(3, timeout=30)
    results: list[Path | BaseException] = []

    def build() -> None:
        barrier.wait()
        try:
            results.append(ensure_demo_checkpoint())
        except BaseException as exc:  # reported below
            results.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [tmp_path / "demo-v1"] * 3
    assert [p.name for p in tmp_path.iterdir()] == ["demo-v1"]  # no temp dirs left behind


def test_unwritable_cache_dir_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("PDLAUNCH_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(PdlaunchError, match="PDLAUNCH_CACHE_DIR"):
        ensure_demo_checkpoint()


def test_demo_config_is_the_documented_llama() -> None:
    arch = load_checkpoint("tiny").arch
    assert arch.architecture == "LlamaForCausalLM"
    assert (arch.hidden_size, arch.num_layers, arch.num_heads, arch.num_kv_heads) == (256, 4, 8, 4)
    assert (arch.intermediate_size, arch.vocab_size, arch.max_position_embeddings) == (512, 512, 2048)
    assert DEMO_HF_CONFIG["tie_word_embeddings"] is False


def test_demo_greedy_matches_transformers() -> None:
    ckpt = load_checkpoint("tiny")
    prompt = ckpt.tokenizer.encode("The capital of France is")
    model = load_model(ckpt, torch.device("cpu"), torch.float32)
    assert PagedRunner(model, block_size=16).greedy(prompt, 12) == hf_greedy(ckpt.path, prompt, 12)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_checkpoint("tiny").tokenizer


@pytest.mark.parametrize("text", ["Hello, world!", "ünïcödé 日本語 🙂", "  spaces\tand\nnewlines  ", ""])
def test_tokenizer_round_trips_text(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert ids[0] == BOS_TOKEN_ID and ids.count(BOS_TOKEN_ID) == 1
    assert all(0 <= i < 512 for i in ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(text, add_special_tokens=False) == ids[1:]


def test_tokenizer_special_ids(tokenizer: Tokenizer) -> None:
    assert tokenizer.bos_token_id == BOS_TOKEN_ID
    assert tokenizer.eos_token_ids == [EOS_TOKEN_ID]
    assert tokenizer.vocab_size == 512
    assert tokenizer.id_to_token(EOS_TOKEN_ID) == "<|end_of_text|>"
    assert tokenizer.decode([72, EOS_TOKEN_ID], skip_special_tokens=False).endswith("<|end_of_text|>")
    assert tokenizer.decode([72, EOS_TOKEN_ID]) == "H"


def test_chat_template_renders_and_tokenizes_with_one_bos(tokenizer: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    text = tokenizer.apply_chat_template(messages)
    assert text == "<|system|>\nBe brief.<|end_of_text|>\n<|user|>\nHi!<|end_of_text|>\n<|assistant|>\n"
    assert not tokenizer.apply_chat_template(messages, add_generation_prompt=False).endswith("<|assistant|>\n")
    ids = tokenizer.encode(text)
    assert ids.count(BOS_TOKEN_ID) == 1
    assert tokenizer.token_to_id("<|user|>") in ids


def test_demo_tokenizer_agrees_with_transformers(tokenizer: Tokenizer) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(load_checkpoint("tiny").path)
    text = "The quick brown fox, 123!"
    assert hf(text)["input_ids"] == tokenizer.encode(text)
    messages = [{"role": "user", "content": "Hi!"}]
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(messages)


def test_template_bos_is_not_doubled(tmp_path: Path) -> None:
    """Templates that render the BOS text (Llama 3 style) still give exactly one BOS."""
    build_demo_checkpoint(tmp_path)
    tok = Tokenizer(tmp_path)
    assert tok.encode("<|begin_of_text|><|user|>\nhi").count(BOS_TOKEN_ID) == 1


def test_missing_chat_template_is_a_clear_error(tmp_path: Path) -> None:
    import json

    build_demo_checkpoint(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(PdlaunchError, match="chat template"):
        Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


def test_generation_config_eos_list_is_merged(tmp_path: Path) -> None:
    import json

    build_demo_checkpoint(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS_TOKEN_ID, 42]}))
    assert Tokenizer(tmp_path).eos_token_ids == [EOS_TOKEN_ID, 42]
