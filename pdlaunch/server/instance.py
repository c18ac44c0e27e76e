"""What every route of an instance reads: its engine loop, config, spec, served model names and sleep
state (`Instance`, kept on the app's state by server/app.py; a handler gets it with `instance_of`).

Model names, as vLLM: `model.served_model_name` (`--served-model-name`, one name or a list) when given,
the first being the one responses report; else the `--model` value exactly as typed (`tiny`, `demo`,
`/data/llama3-8b`, `m.gguf`). Without served names, the directory's or file's basename is accepted
too (`llama3-8b` for `/data/llama3-8b/`), which pdlaunch always did.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Literal

from starlette.requests import Request

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.http.errors import OpenAIError
from pdlaunch.server.engine_loop import EngineLoop

SleepTransition = Literal["falling_asleep", "waking_up"]
# A route handler: a module-level coroutine function taking the request (FastAPI injects its parameters).
Handler = Callable[..., Coroutine[object, object, object]]


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


@dataclass
class Instance:
    engine_loop: EngineLoop
    config: DeploymentConfig
    spec: InstanceSpec
    # The engine's sleep state, written on the engine thread as each sleep or wake_up ends and by GET /is_sleeping
    # (server/sleep.py); a sleeping instance serves nothing
    sleeping: bool = False
    # "falling_asleep" or "waking_up" while the engine thread runs a sleep or wake_up (server/sleep.py), else None
    sleep_transition: SleepTransition | None = None
    model_name: str = field(init=False)  # what responses report
    accepted_names: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        self.model_name = served_model_names(self.config)[0]
        self.accepted_names = accepted_model_names(self.config)

    @property
    def state(self) -> str:
        """/health's and /info's: the engine loop's, or "sleeping"."""
        return "sleeping" if self.sleeping else self.engine_loop.state

    def check_model(self, model: str | None) -> None:
        """404 for a `model` this instance does not serve (None: the client did not name one). Worded for the
        deployment: the proxy passes the answer on as it is, and every instance of a deployment serves the same
        names."""
        if model is not None and model not in self.accepted_names:
            served = served_model_names(self.config)
            them = "them" if len(served) > 1 else "it"
            raise OpenAIError(404, f"model {model!r} is not served here: this deployment serves "
                              f"{', '.join(map(repr, served))} (GET /v1/models lists {them})", param="model",
                              code="model_not_found")

    def check_serving(self) -> None:
        """503 unless the instance takes requests now (awake, engine ready)."""
        if self.sleeping:
            raise OpenAIError(503, "instance is sleeping; POST /wake_up first", code="sleeping")
        self.engine_loop.require_ready()


def instance_of(request: Request) -> Instance:
    """The Instance of the app that received `request`."""
    instance = request.app.state.instance
    if not isinstance(instance, Instance):
        raise OpenAIError(500, "the app carries no instance (build it with server/app.py:build_app)")
    return instance
