"""What an instance answers is validated before the proxy reads it: error bodies of any shape."""

from __future__ import annotations

import pytest

from pdlaunch.proxy.instances import Instance
from pdlaunch.proxy.translate import client_limit_error, error_from_response

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
    error = error_from_response(PREFILL, 400, b'{"error": {"message": "too long", "param": "prompt", "code": 400}}')
    assert (error.message, error.param, error.code) == ("too long", "prompt", "400")
    error = error_from_response(PREFILL, 500, b'{"error": {"message": "boom", "code": "engine_dead"}}')
    assert (error.status, error.code) == (502, "engine_dead") and "boom" in error.message
