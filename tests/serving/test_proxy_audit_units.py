"""What an instance answers is validated before the proxy reads it: error bodies of any shape, control answers."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import Response

from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.proxy.translate import client_limit_error, error_from_response
from tests.serving.helpers import ThreadServer, wait_for

PREFILL = Instance("prefill", "http://127.0.0.1:1", "prefill-0")


@pytest.mark.parametrize("content", [
    b'{"error": {"message": 5}}',
    b'{"error": {"message": ["a"], "param": {"p": 1}, "code": 7}}',
    b'{"error": {"message": "m", "param": 3}}',
    b'{"error": "refused"}',
    b'["error"]',
    b"\xff\xfe",
])
def test_an_error_answer_of_any_shape_becomes_an_error_with_a_text_message(content: bytes) -> None:
    """A prefill leg's 4xx is restated with the client's max_tokens (client_limit_error): its message is text
    whatever the instance sent, never a TypeError (a 500) at the proxy."""
    error = client_limit_error(error_from_response(PREFILL, 400, content), {"prompt": "x"}, chat=False)
    assert error.status == 400
    assert isinstance(error.message, str) and error.message
    assert error.param is None or isinstance(error.param, str)
    assert error.code is None or isinstance(error.code, str)


def test_a_well_formed_error_answer_keeps_its_message_param_and_code() -> None:
    """A named code passes on; vLLM's number (the status) is written again from the status the proxy answers."""
    error = error_from_response(PREFILL, 400, b'{"error": {"message": "too long", "param": "prompt", "code": 400}}')
    assert (error.message, error.param, error.code) == ("too long", "prompt", None)
    assert error.body()["error"]["code"] == 400
    error = error_from_response(PREFILL, 500, b'{"error": {"message": "boom", "code": 500}}')
    assert (error.status, error.code) == (502, "instance_failed")
    error = error_from_response(PREFILL, 500, b'{"error": {"message": "boom", "code": "engine_dead"}}')
    assert (error.status, error.code) == (502, "engine_dead") and "boom" in error.message


class _Sleepy:
    """Answers /is_sleeping with the raw bytes it is given."""

    def __init__(self, content: bytes) -> None:
        self.app = FastAPI()
        self.app.get("/health")(lambda: {"status": "ok"})
        self.app.get("/is_sleeping")(lambda: Response(content, media_type="application/json"))


@pytest.mark.parametrize("content", [b'{"is_sleeping": NaN}', b'{"is_sleeping": "\\ud800"}', b'\x80{}'])
def test_a_control_answer_that_is_no_valid_json_object_is_that_instances_502(content: bytes) -> None:
    """The control calls fan out to every instance: one instance's bad answer is its own 502 in the list, not a
    500 of the whole call (which hid every other instance's answer)."""
    ports = PortAllocator("127.0.0.1")
    with ThreadServer(_Sleepy(b'{"is_sleeping": false}').app, ports.free("p")) as p, \
            ThreadServer(_Sleepy(content).app, ports.free("d")) as d:
        pool = InstancePool([Instance("prefill", p.url, "prefill-0"), Instance("decode", d.url, "decode-0")])
        with ThreadServer(build_proxy_app(pool, 60.0, api_key="key"), ports.free("proxy")) as proxy:
            wait_for(lambda: httpx.get(f"{proxy.url}/health").status_code == 200, "the proxy to see both")
            answer = httpx.get(f"{proxy.url}/is_sleeping", headers={"Authorization": "Bearer key"}, timeout=30)
    assert answer.status_code == 502, answer.text
    listed = {i["name"]: i for i in answer.json()["instances"]}
    assert listed["prefill-0"] == {"name": "prefill-0", "status": 200, "body": {"is_sleeping": False}}
    assert listed["decode-0"]["status"] == 502 and "decode-0" in answer.json()["error"]["message"]
