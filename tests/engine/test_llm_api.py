"""Offline API and `pdlaunch generate`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pdlaunch.cli import app
from pdlaunch.engine.llm import LLM
from pdlaunch.engine.outputs import RequestOutput, SamplingParams
from pdlaunch.errors import EngineError, PdlaunchError


def test_llm_generate_strings_and_token_ids(llama_ckpt) -> None:  # type: ignore[no-untyped-def]
    with LLM(str(llama_ckpt), device="cpu", num_gpu_blocks=64, block_size=8, max_num_seqs=4) as llm:
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        text_out, ids_out = llm.generate(["Hello, my name is", [5, 6, 7]], params)
        assert text_out.prompt == "Hello, my name is"
        assert text_out.prompt_token_ids == llm.tokenizer.encode("Hello, my name is")
        assert len(text_out.token_ids) == 6 and text_out.finish_reason == "length"
        assert text_out.text == llm.tokenizer.decode(text_out.token_ids)
        assert ids_out.prompt is None and ids_out.prompt_token_ids == [5, 6, 7]
        # Per-prompt params; logprobs come back per generated token.
        shorter = params.model_copy(update={"max_tokens": 2, "logprobs": 1})
        a, b = llm.generate([[5, 6, 7], [5, 6, 7]], [params, shorter])
        assert a.token_ids[:2] == b.token_ids and a.token_ids == ids_out.token_ids
        assert a.logprobs is None and b.logprobs is not None and len(b.logprobs) == 2
        llm.engine.check_integrity()


def test_llm_rejects_unknown_options_and_bad_prompts(llama_ckpt) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(EngineError, match="unknown option") as info:
        LLM(str(llama_ckpt), device="cpu", max_num_sequences=3)
    assert info.value.field == "max_num_sequences"
    with LLM(str(llama_ckpt), device="cpu", num_gpu_blocks=64, max_model_len=32) as llm:
        with pytest.raises(EngineError) as info:
            llm.generate([[1, 2], list(range(40))], SamplingParams(max_tokens=4))
        assert info.value.field == "prompt"
        assert not llm.engine.has_unfinished_requests() and llm.engine.block_manager.num_used_blocks() == 0


@pytest.mark.slow
def test_generate_command_prints_json_lines() -> None:
    result = CliRunner().invoke(app, ["generate", "--model", "tiny", "--device", "cpu", "--json", "--max-tokens", "5",
                                      "--prompt", "Hello", "--prompt", "What is the capital of France?"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.strip().splitlines()]
    assert [line["prompt"] for line in lines] == ["Hello", "What is the capital of France?"]
    assert all(set(line) == {"prompt", "text", "token_ids"} and 1 <= len(line["token_ids"]) <= 5 for line in lines)


def test_generate_command_table_and_bad_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(app, ["generate", "--model", "tiny", "--device", "cpu", "--max-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert "Hello, my name is" in result.output and "completion" in result.output
    result = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / "nope"), "--device", "cpu"])
    assert result.exit_code == 1
    assert "model" in result.output and "Traceback" not in result.output


def test_a_failed_generate_leaves_no_request_behind(llama_ckpt) -> None:  # type: ignore[no-untyped-def]
    """A prompt that fails to tokenize after others were added, or a step that raises mid-run (Ctrl-C): the call's
    other requests are aborted, so the next generate neither gets their outputs nor finds their KV blocks taken."""
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    with LLM(str(llama_ckpt), device="cpu", num_gpu_blocks=64, block_size=8) as llm:
        with pytest.raises(PdlaunchError, match="surrogate"):
            llm.generate(["Hello", "bad \ud800 prompt"], params)
        assert not llm.engine.has_unfinished_requests() and llm.engine.block_manager.num_used_blocks() == 0

        step = llm.engine.step
        calls = 0

        def interrupted_step() -> list[RequestOutput]:
            nonlocal calls
            calls += 1
            if calls == 2:
                raise KeyboardInterrupt
            return step()

        llm.engine.step = interrupted_step  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            llm.generate(["Hello", [5, 6, 7]], params)
        llm.engine.step = step  # type: ignore[method-assign]
        assert not llm.engine.has_unfinished_requests() and llm.engine.block_manager.num_used_blocks() == 0
        [out] = llm.generate([[5, 6, 7]], params)
        assert len(out.token_ids) == 4 and out.finish_reason == "length"
        llm.engine.check_integrity()


def test_llm_chat_renders_the_models_chat_template() -> None:
    """`LLM.chat` (vLLM's): a user message's text, or a list of messages, rendered with the chat template and its
    generation prompt, encoded as rendered (no second BOS); the output's prompt is the rendered text."""
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    with LLM("tiny", device="cpu", num_gpu_blocks=64, block_size=8) as llm:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
        one, two = llm.chat(["hi", messages], params)
        for out, conversation in ((one, [{"role": "user", "content": "hi"}]), (two, messages)):
            rendered = llm.tokenizer.apply_chat_template(conversation)
            assert out.prompt == rendered and "hi" in rendered and rendered != "hi"
            assert out.prompt_token_ids == llm.tokenizer.encode(rendered, add_special_tokens=False)
            assert out.token_ids == llm.generate([out.prompt_token_ids], params)[0].token_ids


@pytest.mark.slow
def test_generate_command_chat_renders_the_prompt_as_a_user_message(llama_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`pdlaunch generate --chat`: an instruct model answers a question; without it the prompt is raw text (a chat
    model given a bare question often answers nothing). A checkpoint without a chat template: a --chat error."""
    result = CliRunner().invoke(app, ["generate", "--model", "tiny", "--device", "cpu", "--json", "--max-tokens", "4",
                                      "--chat", "--prompt", "hi"])
    assert result.exit_code == 0, result.output
    line = json.loads(result.output.strip().splitlines()[-1])
    with LLM("tiny", device="cpu") as llm:
        expected = llm.chat(["hi"], SamplingParams(max_tokens=4, temperature=0.0))[0]
    assert line["prompt"] == "hi" and line["token_ids"] == expected.token_ids
    plain = Path(shutil.copytree(llama_ckpt, tmp_path / "no-template"))
    config = json.loads((plain / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["generate", "--model", str(plain), "--device", "cpu", "--chat",
                                      "--prompt", "hi"])
    assert result.exit_code == 1, result.output
    assert "--chat" in result.output and "no chat template" in result.output and "Traceback" not in result.output
