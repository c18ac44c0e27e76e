"""seed_offset (engine/first_token.py skip_draws): a request whose prompt ends with the first k output ids of a
seeded request, with its seed and seed_offset k, goes on with that request's own tokens: colocated (async
scheduling on and off, batched with others) and through PD (the prefill skips k draws before the first token,
the decode k + 1; or k where it recomputes the last prompt token). Random Llama checkpoint, CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from pdlaunch.engine.first_token import skip_draws
from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.engine.outputs import RequestOutput, SamplingParams
from pdlaunch.engine.request import Request
from pdlaunch.errors import EngineError
from tests.engine.conftest import MakeEngine, run_all
from tests.engine.test_engine_connector import CopyConnector, Hub, spec

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 5, 6, 7]
SEEDED = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)


def going_on(k: int, params: SamplingParams = SEEDED) -> SamplingParams:
    """The rest of a `params` request after its first k tokens."""
    return params.model_copy(update={"max_tokens": params.max_tokens - k, "seed_offset": k})


def reference(engine: LLMEngine) -> list[int]:
    ids = run_all(engine, [PROMPT], SEEDED)[0].output_token_ids
    assert len(ids) == SEEDED.max_tokens
    return ids


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]  # cuda: Philox draws, decode graphs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_continuation_with_seed_offset_draws_the_seeded_requests_own_tokens(
        make_engine: MakeEngine, llama_ckpt: Path, async_scheduling: bool, device: str) -> None:
    engine = make_engine(llama_ckpt, device=device, max_num_seqs=8, async_scheduling=async_scheduling)
    assert engine.async_scheduling == async_scheduling
    ids = reference(engine)
    cuts = [1, 4, 9]
    outs = run_all(engine, [PROMPT + ids[:k] for k in cuts] + [PROMPT], [going_on(k) for k in cuts] + [SEEDED])
    assert [o.output_token_ids for o in outs] == [ids[k:] for k in cuts] + [ids]
    # Without the offset the continuation is drawn afresh: the test above proves something.
    fresh = run_all(engine, [PROMPT + ids[:4]], going_on(4).model_copy(update={"seed_offset": 0}))[0]
    assert fresh.output_token_ids != ids[4:]


@pytest.mark.parametrize("greedy", [{"temperature": 0.0}, {"top_k": 1}])
def test_seed_offset_on_a_greedy_request_is_refused(greedy: dict[str, float]) -> None:
    """A greedy request draws nothing: an offset would be accepted and change nothing, so it is refused."""
    with pytest.raises(ValidationError, match="a greedy request .* draws nothing"):
        SamplingParams.model_validate({**SEEDED.model_dump(), **greedy, "seed_offset": 3})
    assert SamplingParams.model_validate({**SEEDED.model_dump(), **greedy, "seed_offset": 0}).seed_offset == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("first_token", [True, False], ids=["first-token", "recompute"])
def test_through_pd_the_prefill_and_the_decode_skip_the_offset(make_engine: MakeEngine, llama_ckpt: Path,
                                                                first_token: bool, device: str) -> None:
    """The prefill draws token k after k skipped draws; a decode given that token skips k + 1, one that
    recomputes the last prompt token draws it itself after k."""
    ids = reference(make_engine(llama_ckpt, device=device))
    hub = Hub()
    p_engine, d_engine = (make_engine(llama_ckpt, device=device, instance=spec(role, name),
                                      connector=CopyConnector(hub, name))
                          for role, name in (("prefill", "P"), ("decode", "D")))  # the instance takes the device
    assert p_engine.device.type == d_engine.device.type == device
    k = 5
    prompt = PROMPT + ids[:k]
    leg = {"do_remote_decode": True, **({"return_first_token": True} if first_token else {})}
    p_engine.add_request("r", prompt, going_on(k).model_copy(update={"max_tokens": 1}), kv_transfer_params=leg)
    answer: RequestOutput | None = None
    while p_engine.has_unfinished_requests():
        answer = next((o for o in p_engine.step() if o.finished), answer)
    assert answer is not None and answer.output_token_ids == ids[k:k + 1] and answer.kv_transfer_params
    assert ("first_token_ids" in answer.kv_transfer_params) == first_token
    d_engine.add_request("r", prompt, going_on(k), answer.kv_transfer_params)
    final: RequestOutput | None = None
    while d_engine.has_unfinished_requests():
        final = next((o for o in d_engine.step() if o.finished), final)
    assert final is not None and final.output_token_ids == ids[k:]
    p_engine.step()  # the decode's notice: the prefill's held blocks go back


def test_an_offset_past_max_model_len_and_the_prompt_is_refused_naming_the_field(make_engine: MakeEngine,
                                                                                 llama_ckpt: Path) -> None:
    engine = make_engine(llama_ckpt)
    cap = engine.max_model_len + len(PROMPT)
    with pytest.raises(EngineError, match=f"exceeds {cap} .max_model_len {engine.max_model_len} . the prompt's "
                                          f"{len(PROMPT)} tokens") as err:
        engine.add_request("r", PROMPT, SEEDED.model_copy(update={"seed_offset": cap + 1}))
    assert err.value.field == "seed_offset" and err.value.hint == f"use at most {cap}"
    assert not engine.has_unfinished_requests()


def test_a_continuation_of_a_request_at_the_cap_is_accepted_and_goes_on(make_engine: MakeEngine,
                                                                        llama_ckpt: Path) -> None:
    """A client's offset at its cap, then a migration's continuation (its offset + the k ids it carries, which its
    prompt carries too): still within the cap, and it draws the client request's own tokens."""
    engine = make_engine(llama_ckpt)
    cap = engine.max_model_len + len(PROMPT)
    at_cap = SEEDED.model_copy(update={"seed_offset": cap})
    ids = run_all(engine, [PROMPT], at_cap)[0].output_token_ids
    k = 4
    rest = at_cap.model_copy(update={"max_tokens": SEEDED.max_tokens - k, "seed_offset": cap + k})
    assert run_all(engine, [PROMPT + ids[:k]], rest)[0].output_token_ids == ids[k:]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab", [50, 151936])
def test_skip_draws_leaves_the_generator_where_that_many_sampled_tokens_do(device: str, vocab: int) -> None:
    """On CUDA the skip jumps Philox's offset (one draw measures a draw's advance); on CPU it draws each."""
    dev, draws = torch.device(device), 7
    sampled = torch.Generator(device=dev).manual_seed(3)
    for _ in range(draws):
        torch.empty(vocab, device=dev).exponential_(generator=sampled)
    request = Request("r", [1], SamplingParams(temperature=1.0, seed=3), 0)
    request.generator = torch.Generator(device=dev).manual_seed(3)
    skip_draws(request, draws, vocab, dev)
    assert torch.equal(request.generator.get_state(), sampled.get_state())
    after = [torch.empty(vocab, device=dev).exponential_(generator=g) for g in (request.generator, sampled)]
    assert torch.equal(after[0], after[1])
    greedy = Request("g", [1], SamplingParams(temperature=0.0, seed=3), 0)
    greedy.generator = torch.Generator(device=dev).manual_seed(3)
    skip_draws(greedy, draws, vocab, dev)  # greedy rows draw nothing
    assert torch.equal(greedy.generator.get_state(), torch.Generator(device=dev).manual_seed(3).get_state())
