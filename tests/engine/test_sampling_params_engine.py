"""Sampling parameters through a real engine (random Llama checkpoint, CPU): each changes the
output as specified, in a batch with requests that do not use it."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.errors import EngineError
from pdlaunch.model.demo_tokenizer import EOS_TOKEN_ID
from tests.engine.conftest import MakeEngine, run_all

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 5, 6, 7]


def greedy(**kw: object) -> SamplingParams:
    kw.setdefault("max_tokens", 12)
    kw.setdefault("ignore_eos", True)
    return SamplingParams(temperature=0.0, **kw)  # type: ignore[arg-type]


@pytest.fixture
def engine(make_engine: MakeEngine, llama_ckpt: Path):  # type: ignore[no-untyped-def]
    return make_engine(llama_ckpt, max_num_seqs=8)


def test_each_parameter_changes_greedy_output_in_one_batch(engine) -> None:  # type: ignore[no-untyped-def]
    base = run_all(engine, [PROMPT], greedy())[0].output_token_ids
    assert len(set(base)) < len(base), "the random model should repeat itself (penalties need that)"
    first = base[0]
    params = {
        "plain": greedy(),
        "bias": greedy(logit_bias={first: -100}),
        "allowed": greedy(allowed_token_ids=[3, 4]),
        "repetition": greedy(repetition_penalty=2.0),
        "frequency": greedy(frequency_penalty=2.0),
        "presence": greedy(presence_penalty=2.0),
        "stop_id": greedy(stop_token_ids=[base[2]], ignore_eos=False),
    }
    outs = dict(zip(params, run_all(engine, [PROMPT] * len(params), list(params.values()))))
    assert outs["plain"].output_token_ids == base  # batched with the others, unchanged
    assert outs["bias"].output_token_ids[0] != first
    assert set(outs["allowed"].output_token_ids) <= {3, 4}
    for name in ("repetition", "frequency", "presence"):
        assert outs[name].output_token_ids != base, name
    assert outs["presence"].output_token_ids[:len(set(base))] != base[:len(set(base))]
    stop_at = base.index(base[2]) + 1
    assert outs["stop_id"].output_token_ids == base[:stop_at] and outs["stop_id"].finish_reason == "stop"


def test_min_tokens_holds_eos_back(engine) -> None:  # type: ignore[no-untyped-def]
    eos_first = greedy(ignore_eos=False, logit_bias={EOS_TOKEN_ID: 100})
    out = run_all(engine, [PROMPT], eos_first)[0]
    assert out.output_token_ids == [EOS_TOKEN_ID] and out.finish_reason == "stop"
    held = run_all(engine, [PROMPT], eos_first.model_copy(update={"min_tokens": 6}))[0]
    assert len(held.output_token_ids) == 7 and held.output_token_ids[-1] == EOS_TOKEN_ID
    assert EOS_TOKEN_ID not in held.output_token_ids[:6] and held.finish_reason == "stop"


def test_stop_string_kept_with_include_stop_str_in_output(engine) -> None:  # type: ignore[no-untyped-def]
    base = run_all(engine, [PROMPT], greedy())[0]
    stop = base.text[4:7]
    assert stop and base.text.find(stop) == 4
    cut, kept = run_all(engine, [PROMPT] * 2,
                        [greedy(stop=[stop]), greedy(stop=[stop], include_stop_str_in_output=True)])
    assert cut.text == base.text[:4] and kept.text == base.text[:7]
    late = run_all(engine, [PROMPT], greedy(stop=[stop], min_tokens=len(base.output_token_ids)))[0]
    assert late.finish_reason == "length"  # no stop string before min_tokens


def test_skip_special_tokens_shows_eos_text(engine) -> None:  # type: ignore[no-untyped-def]
    forced = {"logit_bias": {EOS_TOKEN_ID: 100}, "max_tokens": 3}
    skipped, shown = run_all(engine, [PROMPT] * 2, [greedy(**forced), greedy(skip_special_tokens=False, **forced)])
    assert skipped.output_token_ids == shown.output_token_ids == [EOS_TOKEN_ID] * 3
    eos_text = engine.tokenizer.decode([EOS_TOKEN_ID], skip_special_tokens=False)
    assert skipped.text == "" and shown.text == eos_text * 3 and eos_text


def test_spaces_between_special_tokens_keeps_the_tokenizers_joining(engine) -> None:  # type: ignore[no-untyped-def]
    """vLLM's fast-tokenizer rule: true (its default) is the tokenizer's own joining, false drops only what that puts
    between adjacent added tokens, and byte-level BPE puts nothing there: all three give the same text
    (tests/model/test_spaces_between_special_tokens.py has a tokenizer that spaces them)."""
    forced = {"logit_bias": {EOS_TOKEN_ID: 100}, "max_tokens": 3, "skip_special_tokens": False}
    params = [greedy(**forced), greedy(spaces_between_special_tokens=True, **forced),
              greedy(spaces_between_special_tokens=False, **forced)]
    natural, spaced, joined = run_all(engine, [PROMPT] * 3, params)
    eos_text = engine.tokenizer.decode([EOS_TOKEN_ID], skip_special_tokens=False)
    assert natural.text == spaced.text == joined.text == eos_text * 3


def test_bad_words_and_min_p(engine) -> None:  # type: ignore[no-untyped-def]
    base = run_all(engine, [PROMPT], greedy())[0]
    word = engine.tokenizer.decode([base.output_token_ids[0]]).strip()
    banned = run_all(engine, [PROMPT], greedy(bad_words=[word]))[0]
    assert base.output_token_ids[0] not in banned.output_token_ids
    # min_p=1 keeps only the most likely token: seeded sampling then equals greedy.
    sampled = SamplingParams(temperature=1.5, seed=3, max_tokens=12, ignore_eos=True)
    free, floor = run_all(engine, [PROMPT] * 2, [sampled, sampled.model_copy(update={"min_p": 1.0})])
    assert floor.output_token_ids == base.output_token_ids and free.output_token_ids != base.output_token_ids


def test_out_of_vocabulary_ids_fail_the_request_not_the_step(engine) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(EngineError) as info:
        engine.add_request("oov", PROMPT, greedy(logit_bias={engine.vocab_size: 5.0}))
    assert info.value.field == "logit_bias"
    assert run_all(engine, [PROMPT], greedy(max_tokens=2))[0].finish_reason == "length"


@pytest.mark.gpu
def test_cuda_graph_decode_and_eager_agree_with_every_parameter(make_engine: MakeEngine, llama_ckpt: Path) -> None:
    """Decode steps replayed from CUDA graphs hand their logits to the same sampler as eager steps:
    penalties, bias, min_p, bad words, allowed ids and grammar masks run after the replay."""
    from pdlaunch.engine.structured_output import StructuredOutput

    params = [greedy(repetition_penalty=1.8), greedy(frequency_penalty=1.5, presence_penalty=0.5),
              greedy(logit_bias={7: 4.0}, min_tokens=4, ignore_eos=False), greedy(allowed_token_ids=[3, 4, 9]),
              SamplingParams(temperature=1.0, seed=4, min_p=0.2, max_tokens=12, ignore_eos=True),
              greedy(structured_output=StructuredOutput(kind="regex", value="[a-e]{3,9}"))]
    outs = []
    for eager in (False, True):
        engine = make_engine(llama_ckpt, device="cuda", enforce_eager=eager, max_num_seqs=8)
        assert (engine.runner.graphs is None) == eager
        outs.append([o.output_token_ids for o in run_all(engine, [PROMPT] * len(params), params)])
    assert outs[0] == outs[1]
