"""A request body parsed by http/limits.parse_json_object: what Python's json refuses reads in words a client can act
on, not advice meant for the server's own Python."""

from __future__ import annotations

import sys

import pytest

from pdlaunch.http.errors import OpenAIError
from pdlaunch.http.limits import parse_json_object


def test_an_integer_of_too_many_digits_is_refused_without_pythons_advice() -> None:
    digits = sys.get_int_max_str_digits() + 1
    with pytest.raises(OpenAIError) as info:
        parse_json_object(b'{"max_tokens": ' + b"9" * digits + b"}")
    error = info.value
    assert (error.status, error.param) == (400, "body")
    assert "set_int_max_str_digits" not in error.message, error.message
    assert f"{digits} digits" in error.message and f"at most {sys.get_int_max_str_digits()}" in error.message, (
        error.message
    )


def test_an_integer_within_the_digit_limit_parses() -> None:
    digits = sys.get_int_max_str_digits()
    assert parse_json_object(b'{"seed": ' + b"9" * digits + b"}") == {"seed": int("9" * digits)}
