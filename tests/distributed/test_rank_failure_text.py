"""The reason a failing rank sends rank 0 (RankFailed), which becomes the instance's error: it said only
`str(exc)`, so a bare `assert`, a MemoryError or a StopIteration arrived as "TP rank 1 failed: " with nothing
after, and a KeyError as a quoted name alone. A Python exception now comes with its type and the line that
raised it (the traceback stays in the rank's log, on another node for a remote rank); our own errors, written
for the user, come as they are."""

from __future__ import annotations

import os
import types
from multiprocessing import Pipe

import pytest

from pdlaunch.distributed import worker
from pdlaunch.distributed.message_stream import recv
from pdlaunch.distributed.messages import RankFailed
from pdlaunch.distributed.worker import serve_rank
from pdlaunch.errors import EngineError


def failed_with(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> str:
    """The reason rank 1 sends rank 0 when building it raised `error`."""

    def build(*args: object) -> None:
        raise error

    monkeypatch.setattr(worker, "build_worker_rank", build)
    rank0, link = Pipe()
    config = types.SimpleNamespace(parallel=types.SimpleNamespace(tp=2))  # all serve_rank reads of it here
    with pytest.raises(SystemExit) as exited:
        serve_rank(1, config, None, "cpu", "float32", 64, 0, link, os.getppid())  # type: ignore[arg-type]
    assert exited.value.code == 1
    message = recv(rank0, "TP rank 1")
    assert isinstance(message, RankFailed), message
    return message.message


def test_an_exception_without_text_is_named_by_its_type_and_where_it_was_raised(
        monkeypatch: pytest.MonkeyPatch) -> None:
    reason = failed_with(monkeypatch, AssertionError())
    assert reason.startswith("TP rank 1 failed: AssertionError (raised at test_rank_failure_text.py:"), reason
    assert reason.endswith(" in build)"), reason


def test_a_python_exception_says_its_type(monkeypatch: pytest.MonkeyPatch) -> None:
    reason = failed_with(monkeypatch, KeyError("model.layers.0.mlp.gate_proj.weight"))
    assert reason.startswith("TP rank 1 failed: KeyError: 'model.layers.0.mlp.gate_proj.weight' (raised at "), reason


def test_our_own_error_comes_as_written_for_the_user(monkeypatch: pytest.MonkeyPatch) -> None:
    error = EngineError("no memory is left for the KV cache", field="cache.gpu_memory_utilization", hint="raise it")
    assert failed_with(monkeypatch, error) == f"TP rank 1 failed: {error}"
