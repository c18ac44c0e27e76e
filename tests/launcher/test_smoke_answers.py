"""`pdlaunch smoke` against a proxy whose answers have the wrong shape or fail: a failed check naming what it got, in
which request, which process died meanwhile and where the logs are; never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from rich.console import Console

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.launcher import smoke
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.launcher.process import ChildProcess
from tests.serving.helpers import ThreadServer


def _run_against(app: FastAPI, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                 children: list[ChildProcess] | None = None) -> list[smoke.Check]:
    """smoke._run with a deployment whose proxy is `app` (and whose children are `children`)."""
    def dead_child() -> tuple[ChildProcess, int] | None:
        ended = [c for c in children or [] if c.poll() is not None]
        return (ended[0], ended[0].poll() or 0) if ended else None

    stopped: list[bool] = []
    with ThreadServer(app, PortAllocator("127.0.0.1").free("proxy")) as server:
        fake = SimpleNamespace(proxy_url=server.url, start=lambda: None, stop=lambda: stopped.append(True),
                               log_dir=tmp_path / "logs", dead_child=dead_child)
        monkeypatch.setattr(smoke, "Deployment", lambda cfg, console: SimpleNamespace(cfg=cfg, **vars(fake)))
        checks: list[smoke.Check] = []
        assert smoke._run(DeploymentConfig(), "PD", Console(quiet=True), checks) is None  # noqa: SLF001
    assert stopped == [True]
    assert checks[-1].name == "PD: deployment" and not checks[-1].passed, checks
    return checks


@pytest.mark.parametrize("choices", [[], None])
def test_an_answer_without_choices_is_a_failed_check(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      choices: Any) -> None:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions() -> Any:
        return JSONResponse({"id": "x", "choices": choices})

    checks = _run_against(app, monkeypatch, tmp_path)
    assert len(checks) == 1
    detail = checks[0].detail
    assert detail.startswith("IndexError" if choices == [] else "TypeError"), detail
    assert "in completion 0 (POST http://127.0.0.1:" in detail and "/v1/completions)" in detail, detail
    assert detail.endswith(f"; logs in {tmp_path / 'logs'}"), detail


def test_a_failed_request_names_the_process_that_died_and_its_log(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions() -> Any:
        return {"choices": [{"text": "Paris"}]}

    @app.post("/v1/chat/completions")
    async def chat() -> Any:
        return JSONResponse({"error": {"message": "no decode instance answered"}}, status_code=502)

    decode = ChildProcess("decode-0", [sys.executable, "-c", "raise SystemExit(7)"], tmp_path / "decode-0.log")
    decode.start()
    assert decode.popen is not None
    try:
        decode.popen.wait(60)
    except subprocess.TimeoutExpired:
        decode.stop(0.0)
        pytest.fail("the child did not exit within 60s")
    detail = _run_against(app, monkeypatch, tmp_path, [decode])[-1].detail
    decode.stop(0.0)
    assert detail.startswith("PdlaunchError in chat completion (POST http://127.0.0.1:"), detail
    assert "answered 502" in detail, detail
    assert f"; decode-0 (pid {decode.pid}) exited with code 7, its log: {tmp_path / 'decode-0.log'}" in detail, detail
    assert detail.endswith(f"; logs in {tmp_path / 'logs'}"), detail
