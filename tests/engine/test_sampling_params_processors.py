"""Logits processors and min_p in the sampler, on hand-made logits: each parameter changes the
chosen token as specified, rows without it are untouched, and the whole batch is one call."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from pdlaunch.engine.logits_processors import LogitsProcessors, check_token_ids
from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.engine.sampler import Sampler, SampleRow, apply_min_p
from pdlaunch.errors import EngineError

V = 12
EOS = 11


def greedy(**kw: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, **kw)  # type: ignore[arg-type]


def ramp(n: int = 1) -> torch.Tensor:
    """Logits rising with the token id: greedy picks the largest id (EOS)."""
    return torch.arange(V, dtype=torch.float32).repeat(n, 1)


def sample(rows: list[SampleRow], logits: torch.Tensor, encode: object = None) -> list[int]:
    sampler = Sampler("cpu", eos_token_ids=[EOS], encode=encode)  # type: ignore[arg-type]
    return sampler(logits, rows).token_ids


def test_logit_bias_removes_and_forces_tokens_per_row() -> None:
    rows = [SampleRow(greedy(logit_bias={EOS: -100})), SampleRow(greedy(logit_bias={3: 100})), SampleRow(greedy())]
    assert sample(rows, ramp(3)) == [EOS - 1, 3, EOS]


def test_allowed_token_ids_restrict_the_choice() -> None:
    rows = [SampleRow(greedy(allowed_token_ids=[2, 5])), SampleRow(greedy())]
    assert sample(rows, ramp(2)) == [5, EOS]
    sampler = Sampler("cpu", seed=1)
    random_row = SampleRow(SamplingParams(temperature=5.0, allowed_token_ids=[0, 1, 4]))
    assert {sampler(torch.zeros(1, V), [random_row]).token_ids[0] for _ in range(100)} == {0, 1, 4}


def test_min_tokens_hold_back_eos_and_stop_ids_until_reached() -> None:
    params = greedy(min_tokens=3, max_tokens=5, stop_token_ids=[EOS - 1])
    early = SampleRow(params, output_token_ids=[1, 2])
    done = SampleRow(params, output_token_ids=[1, 2, 3])
    assert sample([early, done], ramp(2)) == [EOS - 2, EOS]
    # ignore_eos: EOS stops nothing, but min_tokens still holds it back (vLLM's _all_stop_token_ids keep the EOS)
    ignoring = SampleRow(greedy(min_tokens=3, ignore_eos=True), output_token_ids=[])
    ignored = SampleRow(greedy(min_tokens=3, ignore_eos=True), output_token_ids=[1, 2, 3])
    assert sample([ignoring, ignored], ramp(2)) == [EOS - 1, EOS]


def test_bad_words_ban_single_tokens_and_the_last_token_of_a_sequence() -> None:
    vocab = {"a": [7], " a": [7], "xy": [4, EOS], " xy": [9, EOS]}

    def encode(text: str) -> list[int]:
        return vocab[text]

    single = SampleRow(greedy(bad_words=["a"]), output_token_ids=[])
    seq_done = SampleRow(greedy(bad_words=["xy"]), output_token_ids=[3, 4])  # "x" just came: ban "y"
    seq_open = SampleRow(greedy(bad_words=["xy"]), output_token_ids=[3, 5])
    logits = ramp(3)
    logits[0, 7] = 100
    assert sample([single, seq_done, seq_open], logits, encode) == [EOS, EOS - 1, EOS]


def test_repetition_penalty_covers_prompt_and_output_and_both_signs() -> None:
    logits = torch.tensor([[4.0, 3.0, -1.0, -1.5]])
    proc = LogitsProcessors([])
    row = SampleRow(greedy(repetition_penalty=2.0), prompt_token_ids=[0], output_token_ids=[2])
    out = proc(logits, [row])
    assert out.tolist() == [[2.0, 3.0, -2.0, -1.5]]
    assert logits.tolist() == [[4.0, 3.0, -1.0, -1.5]]  # the raw scores stay (logprobs read them)


def test_frequency_and_presence_penalties_use_output_counts_only() -> None:
    logits = torch.zeros(2, 4)
    proc = LogitsProcessors([])
    rows = [SampleRow(greedy(frequency_penalty=0.5), prompt_token_ids=[3], output_token_ids=[1, 1, 2]),
            SampleRow(greedy(presence_penalty=1.5), prompt_token_ids=[3], output_token_ids=[1, 1, 2])]
    assert proc(logits, rows).tolist() == [[0.0, -1.0, -0.5, 0.0], [0.0, -1.5, -1.5, 0.0]]
    negative = SampleRow(greedy(frequency_penalty=-2.0), output_token_ids=[0])  # encourages repeats
    assert sample([negative], torch.tensor([[0.0, 1.0, 0.5, 0.0]])) == [0]


def test_rows_without_processing_are_not_copied() -> None:
    logits = ramp(2)
    assert LogitsProcessors([])(logits, [SampleRow(greedy()), SampleRow(SamplingParams())]) is logits


def test_min_p_drops_unlikely_tokens() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = torch.log(probs)
    assert torch.isfinite(apply_min_p(logits, torch.tensor([0.5]))).tolist() == [[True, True, False, False]]
    assert torch.isfinite(apply_min_p(logits, torch.tensor([0.0]))).all()
    sampler = Sampler("cpu", seed=3)
    row = SampleRow(SamplingParams(temperature=1.0, min_p=0.5))
    assert {sampler(logits, [row]).token_ids[0] for _ in range(200)} == {0, 1}


def test_min_p_comes_before_top_p_as_in_vllm() -> None:
    """vLLM drops the tokens below min_p first, then takes top_p of what is left, renormalized: min_p 0.5 leaves
    [0.625, 0.375], whose first token alone reaches top_p 0.6. Taking top_p of the full distribution first kept
    token 1 too (0.5 < 0.6)."""
    sampler = Sampler("cpu", seed=5)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    row = SampleRow(SamplingParams(temperature=1.0, min_p=0.5, top_p=0.6))
    assert {sampler(logits, [row]).token_ids[0] for _ in range(200)} == {0}


def test_logprobs_stay_those_of_the_model() -> None:
    logits = torch.randn(1, V)
    out = Sampler("cpu")(logits, [SampleRow(greedy(logit_bias={0: 100}, logprobs=1))])
    assert out.token_ids == [0]
    assert out.logprobs[0] is not None
    assert out.logprobs[0].logprob == pytest.approx(logits.log_softmax(-1)[0, 0].item(), abs=1e-5)


@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 2.5), ("presence_penalty", -2.01), ("frequency_penalty", 3.0),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", float("inf")),
    ("min_p", -0.1), ("min_p", 1.5), ("min_tokens", -1), ("allowed_token_ids", []), ("bad_words", [""]),
    ("stop", [""]), ("logit_bias", {-1: 1.0}),
])
def test_out_of_range_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        SamplingParams(**{field: value})  # type: ignore[arg-type]
    assert info.value.errors()[0]["loc"][0] == field


def test_repetition_penalty_takes_any_finite_value_above_zero_as_vllm() -> None:
    """It stopped at 2.0, so a request vLLM serves with repetition_penalty 3 was a 400 here."""
    assert SamplingParams(repetition_penalty=3.0).repetition_penalty == 3.0
    assert SamplingParams(repetition_penalty=1e-3).processes_logits


def test_min_tokens_above_max_tokens_is_refused_and_bias_is_clamped() -> None:
    with pytest.raises(ValidationError) as info:
        SamplingParams(max_tokens=4, min_tokens=5)
    assert info.value.errors()[0]["loc"] == ("min_tokens",)
    assert SamplingParams(logit_bias={1: -1e6, 2: 300}).logit_bias == {1: -100.0, 2: 100.0}


def test_token_ids_outside_the_vocabulary_are_refused_before_a_step() -> None:
    for params, field in ((SamplingParams(logit_bias={V: 1.0}), "logit_bias"),
                          (SamplingParams(allowed_token_ids=[0, V + 5]), "allowed_token_ids"),
                          (SamplingParams(stop_token_ids=[2, V]), "stop_token_ids")):
        with pytest.raises(EngineError) as info:
            check_token_ids(params, V)
        assert info.value.field == field
    check_token_ids(SamplingParams(logit_bias={V - 1: 1.0}), V)
