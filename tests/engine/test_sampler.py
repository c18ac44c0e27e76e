"""Sampler: greedy, temperature, top_k, top_p, per-request seeds, logprobs."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.engine.sampler import LOGPROB_FLOOR, NO_TOKEN, Sampler, SampleRow, apply_top_k_top_p

V = 50


def logits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def row(sampler: Sampler, **kw: object) -> SampleRow:
    params = SamplingParams(**kw)  # type: ignore[arg-type]
    gen = sampler.new_request_generator(params.seed) if params.seed is not None else None
    return SampleRow(params, gen)


def test_greedy_is_argmax() -> None:
    s = Sampler("cpu")
    x = logits(4)
    out = s(x, [row(s, temperature=0.0) for _ in range(4)])
    assert out.token_ids == x.argmax(-1).tolist()
    assert out.logprobs == [None] * 4


def test_an_argmax_given_with_the_logits_is_the_greedy_ids_when_nothing_changes_them() -> None:
    """A replayed decode graph computes its logits' argmax; greedy rows take it as it is (a marker value no argmax
    of these logits gives shows it was not recomputed), random rows still sample."""
    s = Sampler("cpu")
    x = logits(3)
    given = torch.tensor([V + 1, V + 2, V + 3])
    assert s.sample_ids(x, [row(s, temperature=0.0) for _ in range(3)], given).tolist() == [V + 1, V + 2, V + 3]
    mixed = s.sample_ids(x, [row(s, temperature=0.0), row(s, temperature=1.0, seed=3), row(s, temperature=0.0)],
                         given).tolist()
    assert mixed[0] == V + 1 and mixed[2] == V + 3 and 0 <= mixed[1] < V


def test_a_given_argmax_is_not_used_once_a_processor_changed_the_logits() -> None:
    s = Sampler("cpu")
    x = logits(2)
    target = int(x[0].argmin())
    rows = [row(s, temperature=0.0, logit_bias={target: 100.0}), row(s, temperature=0.0)]
    out = s(x, rows, torch.tensor([V + 1, V + 2]))
    assert out.token_ids == [target, int(x[1].argmax())]


def test_top_k_one_is_greedy_at_any_temperature() -> None:
    s = Sampler("cpu")
    x = logits(3)
    assert s(x, [row(s, temperature=2.0, top_k=1) for _ in range(3)]).token_ids == x.argmax(-1).tolist()


def test_same_seed_same_tokens_regardless_of_batch() -> None:
    x = logits(5, seed=1)
    alone_sampler = Sampler("cpu", seed=123)
    target = row(alone_sampler, temperature=1.0, seed=42)
    alone = [alone_sampler(x[2:3], [target]).token_ids[0] for _ in range(20)]

    batch_sampler = Sampler("cpu", seed=999)  # a different engine seed must not matter
    target = row(batch_sampler, temperature=1.0, seed=42)
    others = [row(batch_sampler, temperature=1.0), row(batch_sampler, temperature=0.7, seed=7),
              row(batch_sampler, temperature=0.0), row(batch_sampler, temperature=1.5, top_p=0.9)]
    batched = [batch_sampler(x, [others[0], others[1], target, others[2], others[3]]).token_ids[2]
               for _ in range(20)]
    assert alone == batched
    assert len(set(alone)) > 1  # really sampling, not argmax


def test_different_seeds_differ() -> None:
    s = Sampler("cpu")
    x = logits(1, seed=2)
    a, b = row(s, seed=1), row(s, seed=2)
    assert [s(x, [a]).token_ids[0] for _ in range(20)] != [s(x, [b]).token_ids[0] for _ in range(20)]


def test_top_k_only_samples_the_k_best() -> None:
    s = Sampler("cpu", seed=3)
    x = logits(1, seed=3)
    best = set(x[0].topk(3).indices.tolist())
    seen = {s(x, [row(s, temperature=5.0, top_k=3)]).token_ids[0] for _ in range(200)}
    assert seen == best


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    out = apply_top_k_top_p(x, torch.tensor([4]), torch.tensor([0.7]))
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]
    out = apply_top_k_top_p(x, torch.tensor([4]), torch.tensor([0.1]))  # the first token always stays
    assert torch.isfinite(out[0]).tolist() == [True, False, False, False]
    s = Sampler("cpu", seed=4)
    seen = {s(x, [row(s, temperature=1.0, top_p=0.7)]).token_ids[0] for _ in range(200)}
    assert seen == {0, 1}


def test_temperature_sampling_follows_the_distribution() -> None:
    s = Sampler("cpu", seed=5)
    x = torch.log(torch.tensor([[0.25, 0.75]]))
    draws = [s(x, [row(s, temperature=1.0)]).token_ids[0] for _ in range(2000)]
    assert 0.70 < sum(draws) / len(draws) < 0.80


def test_logprobs_chosen_and_top_n() -> None:
    s = Sampler("cpu")
    x = logits(2, seed=6)
    out = s(x, [row(s, temperature=0.0, logprobs=3), row(s, temperature=0.0, logprobs=0)])
    ref = x.log_softmax(-1)
    first, second = out.logprobs
    assert first is not None and second is not None
    assert first.token_id == out.token_ids[0]
    assert math.isclose(first.logprob, ref[0, first.token_id].item(), rel_tol=1e-5)
    assert list(first.top) == ref[0].topk(3).indices.tolist()
    assert second.top == {}
    assert math.isclose(second.logprob, ref[1].max().item(), rel_tol=1e-5)


def test_invalid_sampling_values_name_the_field() -> None:
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"max_tokens": 0}, {"logprobs": 21}):
        with pytest.raises(ValidationError) as info:
            SamplingParams(**bad)  # type: ignore[arg-type]
        assert list(bad)[0] in str(info.value)


@pytest.mark.parametrize("bad", [
    {"temperature": float("nan")}, {"temperature": float("inf")}, {"top_p": float("nan")},
    {"seed": -(2**63) - 1}, {"seed": 2**64}, {"max_tokens": 2**40}, {"top_k": 10**30}, {"stop_token_ids": [-1]},
    {"stop": ["x"] * 257}, {"stop": ["x" * 5000]},
])
def test_non_finite_and_out_of_range_values_are_refused(bad: dict) -> None:
    with pytest.raises(ValidationError) as info:
        SamplingParams(**bad)
    assert list(bad)[0] in str(info.value)
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1


@pytest.mark.parametrize("tiny", [1e-40, 1e-30, 1e-6, 0.0])
def test_temperature_below_eps_is_greedy(tiny: float) -> None:
    s = Sampler("cpu", seed=9)
    x = logits(3, seed=9)
    params = SamplingParams(temperature=tiny)
    assert params.temperature == 0.0 and params.greedy
    assert s(x, [row(s, temperature=tiny) for _ in range(3)]).token_ids == x.argmax(-1).tolist()


def test_small_temperature_is_raised_to_a_finite_division_and_stays_near_greedy() -> None:
    assert SamplingParams(temperature=1e-4).temperature == 1e-2
    s = Sampler("cpu", seed=10)
    x = logits(4, seed=10) * 1e4  # large logits: a 1e-4 division would overflow float32 to inf
    out = s(x, [row(s, temperature=1e-4) for _ in range(4)])
    assert out.token_ids == x.argmax(-1).tolist()
    unchecked = SampleRow(SamplingParams.model_construct(temperature=1e-40, top_k=-1, top_p=1.0, logprobs=None))
    assert s(x[:1], [unchecked]).token_ids == x[:1].argmax(-1).tolist()


def test_top_k_keeps_every_token_tied_with_the_kth() -> None:
    # vLLM keeps the logits >= the k-th largest, so tokens tied with the k-th all stay
    x = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0, 2.0]])
    out = apply_top_k_top_p(x, torch.tensor([2]), torch.tensor([1.0]))
    assert torch.isfinite(out[0]).tolist() == [True, False, True, True, False, True]
    out = apply_top_k_top_p(x, torch.tensor([1]), torch.tensor([1.0]))
    assert torch.isfinite(out[0]).tolist() == [True, False, False, False, False, False]


def test_logprobs_of_a_structured_output_row_come_from_its_masked_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    # vLLM applies the grammar bitmask to the logits before its sampler computes logprobs: a token the grammar
    # forbids is never among the top logprobs, and the chosen one's is its share of what the grammar allows
    import llguidance.torch as llt

    allowed = [7, 9, 11]

    def fill(matcher: object, mask: torch.Tensor, index: int) -> None:
        mask[index] = 0
        mask[index, 0] = sum(1 << t for t in allowed)

    monkeypatch.setattr(llt, "fill_next_token_bitmask", fill)
    s = Sampler("cpu")
    x = logits(2, seed=8)
    plain = row(s, temperature=0.0, logprobs=5)
    grammar = SampleRow(SamplingParams(temperature=0.0, logprobs=5), matcher=object())  # type: ignore[arg-type]
    out = s(x, [plain, grammar])
    unconstrained, constrained = out.logprobs
    assert unconstrained is not None and constrained is not None
    assert list(unconstrained.top) == x[0].log_softmax(-1).topk(5).indices.tolist()
    ref = torch.full((V,), float("-inf"))
    ref[allowed] = x[1, allowed]
    ref = ref.log_softmax(-1)
    assert out.token_ids[1] == int(ref.argmax())
    assert math.isclose(constrained.logprob, ref[out.token_ids[1]].item(), rel_tol=1e-5)
    assert set(list(constrained.top)[:3]) == set(allowed)
    # the two forbidden tokens of the top 5 have logprob -inf, reported as vLLM reports it (JSON has no infinity)
    assert [v for t, v in constrained.top.items() if t not in allowed] == [LOGPROB_FLOOR] * 2


def test_a_row_whose_grammar_allows_nothing_gets_no_token_and_finite_logprobs(monkeypatch: pytest.MonkeyPatch) -> None:
    import llguidance.torch as llt

    def fill(matcher: object, mask: torch.Tensor, index: int) -> None:
        mask[index] = 0  # every token forbidden

    monkeypatch.setattr(llt, "fill_next_token_bitmask", fill)
    s = Sampler("cpu")
    out = s(logits(1, seed=9), [SampleRow(SamplingParams(temperature=0.0, logprobs=2), matcher=object())])  # type: ignore[arg-type]
    lp = out.logprobs[0]
    assert out.token_ids == [NO_TOKEN] and lp is not None
    assert all(math.isfinite(v) for v in [lp.logprob, *lp.top.values()]), lp  # NaN is no JSON number either


def test_a_row_with_top_p_one_keeps_its_tail_when_another_row_of_the_batch_has_top_p() -> None:
    """top_p 1 is off: a row asking for it samples from every token whatever else is in its batch. Its cumulative
    mass rounded to 1.0 in float32 before its least likely tokens, which then were dropped when a batch neighbour's
    top_p < 1 sent the batch through the top_p mask (a seeded request's tokens then depended on the batch)."""
    tail = torch.tensor([[20.0] + [0.0] * 9])  # the nine each ~2e-9: the first's mass rounds to 1.0
    alone = apply_top_k_top_p(tail, torch.tensor([10]), torch.tensor([1.0]))
    batched = apply_top_k_top_p(torch.cat([tail, torch.zeros(1, 10)]), torch.tensor([10, 10]),
                                torch.tensor([1.0, 0.5]))
    assert torch.isfinite(alone[0]).all() and torch.isfinite(batched[0]).all()
    assert torch.equal(batched[0], tail[0])
    # realistic logits: in a 32k vocabulary the float32 running mass reached 1.0 thousands of tokens early
    wide = torch.randn(1, 32000, generator=torch.Generator().manual_seed(0)) * 3
    out = apply_top_k_top_p(torch.cat([wide, wide]), torch.tensor([32000, 32000]), torch.tensor([1.0, 0.9]))
    assert torch.isfinite(out[0]).all()
    # top_k alone in a neighbour row: the same
    out = apply_top_k_top_p(torch.cat([wide, wide]), torch.tensor([32000, 5]), torch.tensor([1.0, 1.0]))
    assert torch.isfinite(out[0]).all() and int(torch.isfinite(out[1]).sum()) == 5
