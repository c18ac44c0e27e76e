"""A request whose body is still arriving when an instance's drain at shutdown runs out is answered as every other
request the drain cuts: 503 shutting_down with Retry-After (http/shutdown_answer.py). It waited in BodyLimit, outside
ShutdownAnswer: nothing cut it, and uvicorn's deadline then cancelled it (a bare 500 and a traceback in the log).
The app's ASGI stack as server/app.py builds it, the request run in a task of its own as uvicorn runs it."""

from __future__ import annotations

from pdlaunch.config.deployment_config import InstanceSpec
from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.server.app import build_app
from pdlaunch.server.engine_loop import EngineLoop
from tests.serving.helpers import answered_shutting_down, drain_ends_while_a_body_arrives, tiny_colocated


def test_a_request_whose_body_still_arrives_when_the_drain_ends_gets_503_shutting_down() -> None:
    cfg = tiny_colocated(256)
    spec = InstanceSpec(role="colocated", port=1, engine_id="test-shutdown-body-arriving-0")
    app = build_app(EngineLoop(lambda: LLMEngine(cfg, spec), max_pending_requests=4), cfg, spec)
    # the drain's end (server/__main__.py: stop_before_deadline)
    answered_shutting_down(drain_ends_while_a_body_arrives(app, app.state.stopping))
