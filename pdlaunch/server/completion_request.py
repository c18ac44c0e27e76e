"""`CompletionRequest`: the body of /v1/completions (shared fields: request_fields.py)."""

from __future__ import annotations

from pydantic import Field, ValidatorFunctionWrapHandler, field_validator, model_validator

from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.http.errors import OpenAIError
from pdlaunch.server.request_fields import MAX_CHOICES, SamplingFields, one_of

PromptType = str | list[int] | list[str] | list[list[int]]


class CompletionRequest(SamplingFields):
    prompt: PromptType
    logprobs: int | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)
    echo: bool = False

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_shape(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        return one_of(value, handler, "a string, a list of strings, a list of token ids or a list of token-id lists")

    @model_validator(mode="after")
    def _choices(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of < self.n:
            raise OpenAIError(400, f"best_of ({self.best_of}) must be greater than or equal to n ({self.n})",
                              param="best_of")
        if self.best_of is not None and self.best_of > self.n and self.stream:
            raise OpenAIError(400, "best_of > n cannot be streamed", param="best_of")
        self._check_prompt_logprobs(self.prompt_logprobs, "prompt_logprobs")
        if self.echo and self.logprobs is not None:
            self._check_prompt_logprobs(self.logprobs, "echo")
        if self.max_tokens == 0 and not self.echo:
            raise OpenAIError(400, "max_tokens: 0 asks for no output, which only echo: true uses (the prompt and, with "
                                   "logprobs, its logprobs); send max_tokens of at least 1", param="max_tokens")
        if self.echo_only() and self.min_tokens:
            raise OpenAIError(400, f"min_tokens: min_tokens ({self.min_tokens}) must be less than or equal to "
                                   "max_tokens (0)", param="min_tokens")
        if self.echo_only() and self.stream:
            raise OpenAIError(400, "max_tokens: 0 with echo (the prompt only) is answered whole: send stream: false",
                              param="stream")
        return self

    def echo_only(self) -> bool:
        """echo with max_tokens 0 (vLLM's, as lm-evaluation-harness scores a prompt): the answer is the prompt
        (with logprobs, its logprobs), no output token. The engine samples one, which the answer leaves out."""
        return self.echo and self.max_tokens == 0

    def prompts(self) -> list[str | list[int]]:
        """Every prompt of the request (a string or token ids): a list of strings or of token-id lists
        is a batch."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise OpenAIError(400, "prompt must not be empty", param="prompt")
        ids = [x for x in prompt if isinstance(x, int)]
        if len(ids) == len(prompt):
            return [ids]
        return [p for p in prompt if not isinstance(p, int)]

    def single_prompt(self) -> str | list[int]:
        """The one prompt of this request (the proxy counts its tokens); a 400 for a list of prompts."""
        prompts = self.prompts()
        if len(prompts) != 1:
            raise OpenAIError(400, "a list of prompts is answered by prompts(), not as one prompt", param="prompt")
        return prompts[0]

    def sampling_params(self) -> SamplingParams:
        # vLLM's rule: echo with logprobs asks for as many prompt logprobs as for output tokens.
        asked = self.prompt_logprobs if self.prompt_logprobs is not None or not self.echo else self.logprobs
        return self._sampling(1 if self.echo_only() else self.max_tokens, self.logprobs, asked)

