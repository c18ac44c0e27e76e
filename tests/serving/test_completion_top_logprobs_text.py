"""The legacy completions' `top_logprobs` is a map from a token's text to its logprob: two alternatives that decode to
the same text (a byte-fallback token beside a merged one, ` a` with and without a leading-space token) share one key.
The key keeps the more likely one's logprob (the first of the ranked alternatives), not the last written, and the
chosen token's own logprob stays under its text."""

from __future__ import annotations

from pdlaunch.engine.outputs import TokenLogprob
from pdlaunch.server.responses import ResponseBuilder

TEXTS = {1: "a", 2: "b", 3: "a", 4: "c"}  # token ids 1 and 3 share the text "a"


def _top(chosen: int, top: dict[int, float]) -> dict[str, float]:
    builder = ResponseBuilder(endpoint="completion", response_id="cmpl-1", model="tiny",
                              detokenize=lambda token_id: TEXTS[token_id],
                              decode=lambda ids: "".join(TEXTS[i] for i in ids), text=TEXTS[chosen],
                              output_token_ids=[chosen], num_output_tokens=1, finish_reason="length",
                              logprobs=[TokenLogprob(chosen, top.get(chosen, -9.0), top)])
    logprobs = builder.choice(0)["logprobs"]
    assert isinstance(logprobs, dict)
    entries = logprobs["top_logprobs"]
    assert isinstance(entries, list) and isinstance(entries[0], dict)
    return {str(k): float(v) for k, v in entries[0].items()}  # type: ignore[arg-type]


def test_alternatives_sharing_a_text_keep_the_more_likely_logprob() -> None:
    # ranked most likely first, as the sampler lists them: "a" (id 1) at -0.5, then "a" again (id 3) at -2.0
    assert _top(2, {1: -0.5, 2: -1.0, 3: -2.0}) == {"a": -0.5, "b": -1.0}


def test_the_chosen_tokens_logprob_stays_under_its_text() -> None:
    # the chosen token (id 3, text "a", -2.0) shares its text with a more likely alternative (id 1, -0.5)
    assert _top(3, {1: -0.5, 4: -1.5, 3: -2.0}) == {"a": -2.0, "c": -1.5}
