"""The proxy's side of tests/serving/test_shutdown_body_arriving.py: a request whose body is still arriving when the
proxy's drain at shutdown runs out is answered 503 shutting_down with Retry-After (http/shutdown_answer.py), as every
other request the drain cuts. It waited in BodyLimit, outside ShutdownAnswer: nothing cut it, and uvicorn's deadline
then cancelled it (a bare 500 and a traceback in the log). The proxy app's ASGI stack as proxy/app.py builds it."""

from __future__ import annotations

from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import InstancePool
from tests.serving.helpers import answered_shutting_down, drain_ends_while_a_body_arrives


def test_a_request_whose_body_still_arrives_when_the_proxys_drain_ends_gets_503_shutting_down() -> None:
    app = build_proxy_app(InstancePool([]), 60.0)
    # the drain's end (http/draining_server.py)
    answered_shutting_down(drain_ends_while_a_body_arrives(app, app.state.proxy_state.proxy.stopping))
