"""Offline use: `LLM(model="demo").generate(prompts, SamplingParams(...))` (raw prompts) or `.chat(conversations)`
(the model's chat template applied), no server; and `pdlaunch generate` (run_generate; `--chat` for the latter),
the same from the command line."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.table import Table

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.engine_config import CacheConfig, ModelConfig, SchedulerConfig
from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.engine.outputs import MAX_INT32, CompletionOutput, RequestOutput, SamplingParams, TokenLogprob
from pdlaunch.errors import ConfigError, EngineError, PdlaunchError

_SECTIONS: dict[str, type[BaseModel]] = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig}
# `pdlaunch generate`'s flags by the config path (or engine field) each sets: a problem names what the user typed.
_GENERATE_FLAGS = {"model.path": "--model", "device": "--device", "model.dtype": "--dtype",
                   "model.quantization": "--quantization", "cache.kv_cache_dtype": "--kv-cache-dtype",
                   "prompt": "--prompt"}


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
        results: list[CompletionOutput | None] = [None] * len(prompt_list)
        try:
            for i, (prompt, p) in enumerate(zip(prompt_list, params_list)):
                ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
                texts.append(prompt if isinstance(prompt, str) else None)
                token_lists.append(ids)
                request_id = f"llm-{next(self._ids)}"
                order[request_id] = i
                self.engine.add_request(request_id, ids, p)
            logprobs: dict[str, list[TokenLogprob]] = {rid: [] for rid in order}
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    logprobs[out.request_id].extend(out.new_logprobs or [])
                    if out.finished:
                        i = order[out.request_id]
                        results[i] = self._completion(texts[i], token_lists[i], out, logprobs[out.request_id])
        except BaseException:
            # A prompt that fails to tokenize or to be added, or an interrupted step (Ctrl-C): this call's other
            # requests would stay in the engine holding KV blocks, and their outputs would reach the next call.
            for rid in order:
                self.engine.abort_request(rid)
            raise
        return [r for r in results if r is not None]

    def chat(self, conversations: Sequence[str | Sequence[Mapping[str, object]]],
             params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[CompletionOutput]:
        """The assistant's reply to each conversation (one user message's text, or a list of {"role", "content"}
        messages), rendered with the model's chat template and its generation prompt, as vLLM's `LLM.chat`; the
        rendered text is encoded as it is (a BOS only where the template writes one). Each output's prompt is the
        rendered text. A checkpoint without a chat template: PdlaunchError (model.path)."""
        rendered = [self.tokenizer.apply_chat_template([{"role": "user", "content": c}] if isinstance(c, str) else c)
                    for c in conversations]
        outputs = self.generate([self.tokenizer.encode(text, add_special_tokens=False) for text in rendered], params)
        return [replace(out, prompt=text) for out, text in zip(outputs, rendered, strict=True)]

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


def _checked_config(model: str, device: str, dtype: str, options: Mapping[str, object],
                    flags: Mapping[str, str]) -> DeploymentConfig:
    """The resolved config of `pdlaunch generate`, after the checks check-config makes of the same flags
    (values, model checkpoint, device): each problem is named by its flag (`flags`: config path -> flag)."""
    from pdlaunch.config.errors_format import problems_from_validation_error
    from pdlaunch.config.flag_names import name_flags
    from pdlaunch.config.validate import validate_deployment
    from pdlaunch.memory import host_devices

    try:
        cfg = build_config(model, device, dtype, options)
    except ValidationError as exc:
        raise ConfigError(name_flags(problems_from_validation_error(exc), dict(flags))) from None
    if cfg.device == "cuda" and not host_devices.cuda_available():  # check-config's hint names flags not here
        raise EngineError("cuda requested but no CUDA device is visible on this machine", field="--device",
                          hint="use --device cpu or auto")
    problems, resolved = validate_deployment(cfg, target=None)
    ours = [p for p in problems if p.field in flags]  # not the proxy's, ports, log_dir: no server here
    if ours:
        raise ConfigError(name_flags(ours, dict(flags)))
    return resolved


def run_generate(model: str, device: str, prompts: list[str], max_tokens: int, temperature: float, dtype: str,
                 json_output: bool, options: dict[str, str | None] | None = None, model_flag: str = "--model",
                 chat: bool = False) -> None:
    """Generate for every prompt; with `json_output` one {"prompt", "text", "token_ids"} per line.
    `options`: further model/cache config fields (quantization, kv_cache_dtype); `model_flag`: how the user gave
    the model (`MODEL`, the positional argument, or `--model`), which a problem with it names; `chat`: each prompt
    is a user message, rendered with the model's chat template (`--chat`; the output's prompt stays as typed)."""
    flags = {**_GENERATE_FLAGS, "model.path": model_flag}
    if not 1 <= max_tokens <= MAX_INT32:
        raise EngineError(f"{max_tokens} is out of range", field="--max-tokens",
                          hint=f"give a number of tokens from 1 to {MAX_INT32}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise EngineError(f"{temperature} is not a finite number >= 0", field="--temperature",
                          hint="0 = greedy, e.g. 0.7 to sample")
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
    limit = _checked_config(model, device, dtype, options or {}, flags).model.max_model_len
    if limit is not None and max_tokens >= limit:
        raise EngineError(f"{max_tokens} tokens leave no room for a prompt within the model's max_model_len {limit}",
                          field="--max-tokens", hint=f"use --max-tokens {limit - 1} or less")
    try:
        with LLM(model, device=device, dtype=dtype, **(options or {})) as llm:
            if chat and not llm.tokenizer.chat_template:
                raise PdlaunchError(f"{model!r} has no chat template to render the prompts with", field="--chat",
                                    hint="drop --chat to generate from the raw prompts, or give a checkpoint whose "
                                         "tokenizer_config.json (or chat_template.jinja) has a chat template")
            outputs = ([replace(out, prompt=typed) for out, typed in zip(llm.chat(prompts, params), prompts,
                                                                          strict=True)]
                       if chat else llm.generate(prompts, params))
    except PdlaunchError as exc:
        flag = flags.get(exc.field or "")
        if flag is None or isinstance(exc, ConfigError):
            raise
        hint = exc.hint.replace("max_tokens", "--max-tokens") if exc.hint else None
        raise PdlaunchError(exc.message, field=flag, hint=hint) from None
    try:
        if json_output:
            for out in outputs:
                typer.echo(json.dumps({"prompt": out.prompt, "text": out.text, "token_ids": out.token_ids}))
            return
        table = Table("prompt", "completion", "tokens", "finish", title=f"pdlaunch generate ({model})")
        for out in outputs:
            table.add_row(out.prompt or "", out.text, str(len(out.token_ids)), out.finish_reason or "")
        Console().print(table)
    except OSError as exc:  # a full disk or a closed pipe behind stdout: the generation itself went fine
        raise PdlaunchError(f"cannot write the generated text to standard output: {exc.strerror or exc}",
                            field="stdout", hint="redirect it (`> FILE`) to a file you can write") from None
