"""The names a deployment's model answers to in the OpenAI API (`model` of requests, /v1/models).

As vLLM: `model.served_model_name` (`--served-model-name`, one name or a list) when given, the first
being the one responses report; else the `--model` value exactly as typed (`tiny`, `demo`,
`/data/llama3-8b`, `m.gguf`). Without served names, the directory's or file's basename is accepted
too (`llama3-8b` for `/data/llama3-8b/`), which pdlaunch always did.
"""

from __future__ import annotations

from pathlib import PurePath

from pdlaunch.config.models import DeploymentConfig


def served_model_names(config: DeploymentConfig) -> list[str]:
    """Listed by /v1/models, first = the name responses carry."""
    served = config.model.served_model_name
    if served is None:
        return [config.model.path]
    return [served] if isinstance(served, str) else list(served)


def accepted_model_names(config: DeploymentConfig) -> frozenset[str]:
    """Every `model` value a request may carry."""
    names = set(served_model_names(config))
    if config.model.served_model_name is None:
        names.add(PurePath(config.model.path).name)
    return frozenset(names)
