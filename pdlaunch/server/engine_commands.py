"""What the HTTP side puts on the engine thread's command queue (engine_loop.py puts, engine_thread.py takes): a
request to add, an abort, a function to run there (engine_call.py), and None, the stop sentinel.

Apart from both threads' code because each command is the contract between them: what a handler hands over, and
what the engine thread may rely on when it takes it (a request's kv_transfer_params already parsed, its grammar's
matcher already built unless a stop cancelled the build).
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.kv_transfer.params import KVTransferParams
from pdlaunch.server.engine_call import Call
from pdlaunch.server.request_stream import RequestStream

if TYPE_CHECKING:
    from llguidance import LLMatcher


@dataclass(eq=False)  # one per request submitted: EngineThread._adds holds them by identity
class Add:
    stream: RequestStream
    prompt_token_ids: list[int]
    params: SamplingParams
    kv_transfer_params: KVTransferParams | None  # parsed by the engine's boundary (submit)
    matcher: Future[LLMatcher] | None = None  # structured output: its grammar's matcher, built (submit)
    # Its params asked for a remote prefill but had expired (engine_requests.params_expired): the engine thread counts
    # a recompute once engine.add_request took it.
    params_expired: bool = False


@dataclass
class Abort:
    request_id: str


Command = Add | Abort | Call[object] | None  # None: the stop sentinel
