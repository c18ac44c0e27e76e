"""Offline use: `LLM(model="demo").generate(prompts, SamplingParams(...))`, no server; and `pdlaunch generate`
(run_generate), the same from the command line."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from pdlaunch.config.models import CacheConfig, DeploymentConfig, ModelConfig, SchedulerConfig
from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.engine.outputs import CompletionOutput, RequestOutput, SamplingParams, TokenLogprob
from pdlaunch.errors import EngineError

_SECTIONS: dict[str, type[BaseModel]] = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig}


def build_config(model: str, device: str, dtype: str, overrides: Mapping[str, object]) -> DeploymentConfig:
    """A colocated deployment; each override names a field of model/cache/scheduler config."""
    sections: dict[str, dict[str, object]] = {"model": {"path": model, "dtype": dtype}, "cache": {}, "scheduler": {}}
    for key, value in overrides.items():
        section = next((name for name, cls in _SECTIONS.items() if key in cls.model_fields), None)
        if section is None or key == "path":
            known = sorted(f for cls in _SECTIONS.values() for f in cls.model_fields if f != "path")
            raise EngineError(f"unknown option {key!r}", field=key, hint=f"known options: {', '.join(known)}")
        sections[section][key] = value
    return DeploymentConfig.model_validate({"device": device, "colocated": True, **sections})


class LLM:
    """An engine in this process. Options are model/cache/scheduler config fields, e.g.
    `LLM("demo", device="cpu", max_num_seqs=8, num_gpu_blocks=256, enable_prefix_caching=False)`."""

    def __init__(self, model: str = "demo", device: str = "auto", dtype: str = "auto", **overrides: object) -> None:
        self.engine = LLMEngine(build_config(model, device, dtype, overrides))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[CompletionOutput]:
        """Run every prompt to completion (batched by the scheduler); results in prompt order."""
        prompt_list: list[str | Sequence[int]] = [prompts] if isinstance(prompts, str) else list(prompts)
        params_list = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompt_list)
        if len(params_list) != len(prompt_list):
            raise EngineError(f"{len(params_list)} sampling params for {len(prompt_list)} prompts", field="params",
                              hint="give one SamplingParams, or one per prompt")
        order: dict[str, int] = {}
        texts: list[str | None] = []
        token_lists: list[list[int]] = []
        for i, (prompt, p) in enumerate(zip(prompt_list, params_list)):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
            texts.append(prompt if isinstance(prompt, str) else None)
            token_lists.append(ids)
            request_id = f"llm-{next(self._ids)}"
            order[request_id] = i
            try:
                self.engine.add_request(request_id, ids, p)
            except BaseException:
                for rid in list(order)[:-1]:
                    self.engine.abort_request(rid)
                raise
        results: list[CompletionOutput | None] = [None] * len(prompt_list)
        logprobs: dict[str, list[TokenLogprob]] = {rid: [] for rid in order}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                logprobs[out.request_id].extend(out.new_logprobs or [])
                if out.finished:
                    i = order[out.request_id]
                    results[i] = self._completion(texts[i], token_lists[i], out, logprobs[out.request_id])
        return [r for r in results if r is not None]

    @staticmethod
    def _completion(prompt: str | None, prompt_ids: list[int], out: RequestOutput,
                    logprobs: list[TokenLogprob]) -> CompletionOutput:
        wanted = out.new_logprobs is not None or bool(logprobs)
        return CompletionOutput(prompt, prompt_ids, out.text, list(out.output_token_ids), out.finish_reason,
                                logprobs if wanted else None, out.num_cached_tokens)

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def run_generate(model: str, device: str, prompts: list[str], max_tokens: int, temperature: float, dtype: str,
                 json_output: bool, options: dict[str, str | None] | None = None) -> None:
    """Generate for every prompt; with `json_output` one {"prompt", "text", "token_ids"} per line.
    `options`: further model/cache config fields (quantization, kv_cache_dtype)."""
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
    except ValueError as exc:
        field = "--max-tokens" if "max_tokens" in str(exc) else "--temperature"
        raise EngineError("must be at least 1" if field == "--max-tokens" else "must be at least 0",
                          field=field) from None
    with LLM(model, device=device, dtype=dtype, **(options or {})) as llm:
        outputs = llm.generate(prompts, params)
    if json_output:
        for out in outputs:
            typer.echo(json.dumps({"prompt": out.prompt, "text": out.text, "token_ids": out.token_ids}))
        return
    table = Table("prompt", "completion", "tokens", "finish", title=f"pdlaunch generate ({model})")
    for out in outputs:
        table.add_row(out.prompt or "", out.text, str(len(out.token_ids)), out.finish_reason or "")
    Console().print(table)
