"""An instance past its pending-request limit answers 503 `overloaded` in the OpenAI error shape, with a message that
says the limit, the settings that set it (as a user writes them: the YAML key and the serve flag) and that the client
should retry with backoff; the proxy passes that message on."""

from __future__ import annotations

import asyncio
import json

import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.http import JsonObject
from pdlaunch.http.errors import OpenAIError
from pdlaunch.proxy.instances import Instance
from pdlaunch.proxy.translate import error_from_response
from pdlaunch.server.__main__ import max_pending_requests, pending_limit_source
from pdlaunch.server.engine_loop import EngineLoop
from tests.serving.test_engine_loop_idle import CountingEngine


class HoldingEngine(CountingEngine):
    """An engine that takes every request and finishes none: each stays pending (nothing to step)."""

    def __init__(self) -> None:
        super().__init__()
        self.added: list[str] = []

    def check_kv_transfer_params(self, params: JsonObject | None) -> None:
        return None

    def add_request(self, request_id: str, *_: object) -> None:
        with self.lock:
            self.added.append(request_id)

    def abort_request(self, request_id: str) -> None:
        return None


def test_the_overloaded_503_names_the_limit_its_settings_and_a_retry() -> None:
    config = DeploymentConfig.model_validate({"device": "cpu", "colocated": True, "instances": [{"role": "colocated"}],
                                              "scheduler": {"max_num_seqs": 40}})
    limit = max_pending_requests(config)
    assert limit == 320  # 8 x 40, above the floor of 256
    engine = HoldingEngine()
    loop = EngineLoop(lambda: engine, max_pending_requests=limit, quiescent_wait_s=600.0,  # type: ignore[arg-type,return-value]
                      pending_limit_source=pending_limit_source(config))
    loop.start()
    assert loop.wait_ready(30), "the engine loop to start"
    try:
        async def fill_then_one_more() -> OpenAIError:
            for i in range(limit):
                loop.submit(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=1))
            with pytest.raises(OpenAIError) as refused:
                loop.submit("one-too-many", [1, 2, 3], SamplingParams(max_tokens=1))
            return refused.value

        error = asyncio.run(fill_then_one_more())
    finally:
        loop.stop()
    assert error.status == 503 and error.code == "overloaded"
    body = error.body()["error"]
    assert body["type"] == "service_unavailable_error" and body["code"] == "overloaded"
    message = error.message
    assert "320 requests pending, this instance's limit of 320" in message, message
    assert "8 x scheduler.max_num_seqs (40), at least 256" in message, message
    assert "`max_num_seqs` under `scheduler:`" in message and "`--max-num-seqs`" in message, message
    assert "retry with backoff" in message, message
    # The proxy answers the client with the instance's message under its name, still 503 `overloaded`.
    relayed = error_from_response(Instance(name="colocated-0", url="http://127.0.0.1:1", role="colocated"), 503,
                                  json.dumps(error.body()).encode())
    assert relayed.status == 503 and relayed.code == "overloaded"
    assert relayed.message == f"colocated-0 is unavailable: {message}"


def test_under_the_floor_the_503_says_how_far_max_num_seqs_must_rise() -> None:
    """With max_num_seqs 16 the floor of 256 sets the limit (8 x 16 is 128): raising max_num_seqs to 32 changes
    nothing, so the message says the value that does (above 32), not only "raise max_num_seqs"."""
    config = DeploymentConfig.model_validate({"device": "cpu", "colocated": True, "instances": [{"role": "colocated"}],
                                              "scheduler": {"max_num_seqs": 16}})
    assert max_pending_requests(config) == 256
    source = pending_limit_source(config)
    assert "8 x scheduler.max_num_seqs (16), at least 256" in source, source
    assert "above 32" in source, source
    above = DeploymentConfig.model_validate({"device": "cpu", "colocated": True,
                                             "instances": [{"role": "colocated"}], "scheduler": {"max_num_seqs": 40}})
    assert "above" not in pending_limit_source(above)
