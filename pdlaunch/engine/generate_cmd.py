"""`pdlaunch generate`: offline generation from the command line."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from pdlaunch.engine.llm import LLM
from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.errors import EngineError


def run_generate(model: str, device: str, prompts: list[str], max_tokens: int, temperature: float, dtype: str,
                 json_output: bool, options: dict[str, Any] | None = None) -> None:
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
