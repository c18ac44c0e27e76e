"""`pdlaunch smoke` against a proxy whose answers have the wrong shape: a failed check naming what it got, never a
traceback."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from rich.console import Console

from pdlaunch.config.models import DeploymentConfig
from pdlaunch.launcher import smoke
from pdlaunch.launcher.ports import PortAllocator
from tests.serving.helpers import ThreadServer


@pytest.mark.parametrize("choices", [[], None])
def test_an_answer_without_choices_is_a_failed_check(monkeypatch: pytest.MonkeyPatch, choices: Any) -> None:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions() -> Any:
        return JSONResponse({"id": "x", "choices": choices})

    stopped: list[bool] = []
    with ThreadServer(app, PortAllocator("127.0.0.1").free("proxy")) as server:
        fake = SimpleNamespace(proxy_url=server.url, start=lambda: None, stop=lambda: stopped.append(True))
        monkeypatch.setattr(smoke, "Deployment", lambda cfg, console: SimpleNamespace(cfg=cfg, **vars(fake)))
        checks: list[smoke.Check] = []
        assert smoke._run(DeploymentConfig(), "PD", Console(quiet=True), checks) is None  # noqa: SLF001
    assert stopped == [True]
    assert [c.name for c in checks] == ["PD: deployment"] and not checks[0].passed
    assert checks[0].detail.startswith("IndexError" if choices == [] else "TypeError"), checks[0].detail
