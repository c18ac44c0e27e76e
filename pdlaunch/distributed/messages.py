"""What TP rank 0 and its other ranks say to each other: one type per message, each checking its own fields.

The stream is a multiprocessing `Connection`: a pipe to a local worker (worker.py), an authenticated
TCP link to a rank on another node (remote_link.py); message_stream.py sends and receives these.

Rank 0 -> rank r:
  Setup(device_type, dtype_name, max_model_len)  what a remote rank cannot read from its own config
  Execute(inputs)                          forward this rank's shard of one engine step
  StartLoad / RequestFinished / GetFinished / AbortLoad / ReleaseUnloaded / ReleaseHeld / ForgetEngine
                                           mirror a scheduler-side call on rank r's own connector
  Shutdown()                               leave the group and exit 0
Rank r -> rank 0:
  Hello(rank)                              a remote rank's first message on its link
  Ready(engine_id, side_channel_port, side_channel_host)   built, once
  Reply(value)                             the connector's answer, for calls whose `reply_type` is set
  RankFailed(message)                      the reason, just before the rank exits non-zero

`problem()` says why a message's fields do not hold what it carries (a type, a range, a length), and a
call's `reply_problem` why a Reply's value does not answer it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Final, TypeAlias, get_args

import torch

from pdlaunch.config.strict_model import DType
from pdlaunch.kv_transfer.base import KVConnectorEvents, LoadOutcome
from pdlaunch.kv_transfer.params import KVTransferParams, PrefillAnswer, RemoteDecodeRequest, UnsignedPush
from pdlaunch.runner.step_inputs import StepInputs

DEVICE_TYPES: Final = ("cuda", "cpu")  # what rank_device (rank.py) places a rank on
DTYPE_NAMES: Final = get_args(DType)
MAX_PORT = 65535
_PARAMS_TYPES: Final = (RemoteDecodeRequest, PrefillAnswer, UnsignedPush)  # KVTransferParams' members

# Frozen slotted dataclasses: pickled as the class name plus their fields, built without validation. `recv`
# checks the fields with `problem()`: a few isinstance checks, no walk over a payload (Execute goes out every
# engine step, and a prompt's token ids may be long).


def _a(value: object) -> str:
    """"a str", "an int": the type of `value` in words."""
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _int_problem(name: str, value: object, low: int, high: int | None = None) -> str | None:
    """Why `value` is not an int in [low, high], or None."""
    if not isinstance(value, int) or isinstance(value, bool):
        return f"{name} is {_a(value)}, not an int"
    if value < low or (high is not None and value > high):
        return f"{name} is {value}, out of range [{low}, {'...' if high is None else high}]"
    return None


def _type_problem(name: str, value: object, kind: type | tuple[type, ...], what: str) -> str | None:
    """Why `value` is not a `kind` (`what` says it in words), or None."""
    return None if isinstance(value, kind) else f"{name} is {_a(value)}, not {what}"


def _first(*problems: str | None) -> str | None:
    return next((p for p in problems if p is not None), None)


def _block_ids_problem(block_ids: object) -> str | None:
    """Why `block_ids` is not a list of lists (one per KV-cache group: a few), or None."""
    if not isinstance(block_ids, list):
        return f"block_ids is {_a(block_ids)}, not a list (one list per KV-cache group)"
    bad = next((b for b in block_ids if not isinstance(b, list)), None)
    return None if bad is None else f"block_ids holds {_a(bad)}, not a list of block ids"


def _request_problem(request_id: object, prompt_token_ids: object, params: object, block_ids: object) -> str | None:
    return _first(_type_problem("request_id", request_id, str, "a str"),
                  _type_problem("prompt_token_ids", prompt_token_ids, list, "a list"),
                  None if params is None else _type_problem("kv_transfer_params", params, _PARAMS_TYPES,
                                                            "kv_transfer_params or None"),
                  _block_ids_problem(block_ids))


def _ids_problem(name: str, ids: object, kind: type[set[str]] | type[dict[str, str]]) -> str | None:
    """Why `ids` (a few request ids of one step's events) is not a `kind` of strs, or None."""
    if not isinstance(ids, kind):
        return f"{name} is {_a(ids)}, not a {kind.__name__}"
    bad = next((i for i in ids if not isinstance(i, str)), None)
    return None if bad is None else f"{name} holds {_a(bad)}, not a request id (str)"


def _outcomes_problem(outcomes: object) -> str | None:
    """Why `outcomes` is not load_outcomes (request id -> LoadOutcome of bounded values), or None."""
    problem = _ids_problem("load_outcomes", outcomes, dict)
    if problem is not None or not isinstance(outcomes, dict):
        return problem
    for rid, outcome in outcomes.items():
        if not isinstance(outcome, LoadOutcome):
            return f"load_outcomes[{short(rid)}] is {_a(outcome)}, not a LoadOutcome"
        problem = outcome.problem()
        if problem is not None:
            return f"load_outcomes[{short(rid)}]: {problem}"
    return None


def _events_problem(events: object) -> str | None:
    """Why `events` is not KVConnectorEvents of request ids, or None."""
    if not isinstance(events, KVConnectorEvents):
        return f"the value is {_a(events)}, not KVConnectorEvents"
    failed = events.failed_recving
    return _first(*(_ids_problem(name, getattr(events, name), set) for name in
                    ("finished_sending", "finished_recving", "draining", "safe_to_free")),
                  _ids_problem("failed_recving", failed, dict),
                  None if not isinstance(failed, dict) or all(isinstance(e, str) for e in failed.values())
                  else "failed_recving holds an error that is not a str",
                  _outcomes_problem(events.load_outcomes))


@dataclass(frozen=True, slots=True)
class Setup:
    device_type: str
    dtype_name: str
    max_model_len: int

    def problem(self) -> str | None:
        return _first(None if self.device_type in DEVICE_TYPES else
                      f"device_type is {self.device_type!r}, not one of {', '.join(DEVICE_TYPES)}",
                      None if self.dtype_name in DTYPE_NAMES else
                      f"dtype_name is {self.dtype_name!r}, not one of {', '.join(DTYPE_NAMES)}",
                      _int_problem("max_model_len", self.max_model_len, 1))


@dataclass(frozen=True, slots=True)
class Execute:
    inputs: StepInputs

    def problem(self) -> str | None:
        inputs = self.inputs
        if not isinstance(inputs, StepInputs):
            return f"inputs is {_a(inputs)}, not StepInputs"
        if not isinstance(inputs.input_ids, torch.Tensor) or not isinstance(inputs.positions, torch.Tensor):
            return "input_ids or positions is not a tensor"
        if inputs.input_ids.shape != inputs.positions.shape:
            return f"input_ids {tuple(inputs.input_ids.shape)} and positions {tuple(inputs.positions.shape)} differ"
        if not isinstance(inputs.slot_mapping, list) or not isinstance(inputs.block_tables, list) or \
                len(inputs.slot_mapping) != len(inputs.block_tables):
            return "slot_mapping and block_tables are not lists of one entry per KV-cache group"
        return None


@dataclass(frozen=True, slots=True)
class MirroredCall:
    """A scheduler-side call rank 0 made on its connector, to repeat on rank r's (tp_connector.py)."""

    # Type of the value rank r answers with (reply_problem checks it); None: no answer is sent.
    reply_type: ClassVar[type | tuple[type, ...] | None] = bool

    def problem(self) -> str | None:
        return None

    def reply_problem(self, value: object) -> str | None:
        """Why `value` is not an answer to this call, or None."""
        return _type_problem("the value", value, bool, "a bool")


@dataclass(frozen=True, slots=True)
class StartLoad(MirroredCall):
    reply_type: ClassVar[type | tuple[type, ...] | None] = None
    request_id: str
    prompt_token_ids: list[int]
    kv_transfer_params: KVTransferParams | None
    block_ids: list[list[int]]
    num_local_computed_tokens: int
    num_external_tokens: int

    def problem(self) -> str | None:
        return _first(_request_problem(self.request_id, self.prompt_token_ids, self.kv_transfer_params,
                                       self.block_ids),
                      _int_problem("num_local_computed_tokens", self.num_local_computed_tokens, 0),
                      _int_problem("num_external_tokens", self.num_external_tokens, 0))


@dataclass(frozen=True, slots=True)
class RequestFinished(MirroredCall):
    reply_type: ClassVar[type | tuple[type, ...] | None] = tuple  # (hold, kv_transfer_params)
    request_id: str
    prompt_token_ids: list[int]
    kv_transfer_params: KVTransferParams | None
    block_ids: list[list[int]]

    def problem(self) -> str | None:
        return _request_problem(self.request_id, self.prompt_token_ids, self.kv_transfer_params, self.block_ids)

    def reply_problem(self, value: object) -> str | None:
        if not isinstance(value, tuple) or len(value) != 2:
            size = f" of {len(value)}" if isinstance(value, tuple) else ""
            return f"the value is {_a(value)}{size}, not a pair (hold, kv_transfer_params)"
        return _first(_type_problem("hold", value[0], bool, "a bool"),
                      None if value[1] is None else
                      _type_problem("kv_transfer_params", value[1], PrefillAnswer, "a PrefillAnswer or None"))


@dataclass(frozen=True, slots=True)
class GetFinished(MirroredCall):
    reply_type: ClassVar[type | tuple[type, ...] | None] = KVConnectorEvents

    def reply_problem(self, value: object) -> str | None:
        return _events_problem(value)


@dataclass(frozen=True, slots=True)
class AbortLoad(MirroredCall):
    request_id: str

    def problem(self) -> str | None:
        return _type_problem("request_id", self.request_id, str, "a str")


@dataclass(frozen=True, slots=True)
class ReleaseUnloaded(MirroredCall):
    """A decode request ended before its load started: each rank tells the prefill rank(s) holding its part."""

    reply_type: ClassVar[type | tuple[type, ...] | None] = None
    request_id: str
    prompt_token_ids: list[int]
    kv_transfer_params: KVTransferParams | None

    def problem(self) -> str | None:
        return _first(_type_problem("request_id", self.request_id, str, "a str"),
                      _type_problem("prompt_token_ids", self.prompt_token_ids, list, "a list"),
                      None if self.kv_transfer_params is None else
                      _type_problem("kv_transfer_params", self.kv_transfer_params, _PARAMS_TYPES,
                                    "kv_transfer_params or None"))


@dataclass(frozen=True, slots=True)
class ReleaseHeld(MirroredCall):
    request_id: str

    def problem(self) -> str | None:
        return _type_problem("request_id", self.request_id, str, "a str")


@dataclass(frozen=True, slots=True)
class ForgetEngine(MirroredCall):
    """Another engine died: drop its agents (KVConnector.forget_engine); the rank answers how many went."""

    reply_type: ClassVar[type | tuple[type, ...] | None] = int
    engine_id: str

    def problem(self) -> str | None:
        return _type_problem("engine_id", self.engine_id, str, "a str")

    def reply_problem(self, value: object) -> str | None:
        return _int_problem("the value", value, 0)


@dataclass(frozen=True, slots=True)
class Shutdown:
    def problem(self) -> str | None:
        return None


@dataclass(frozen=True, slots=True)
class Hello:
    rank: int  # the sender's TP rank; rank 0 accepts each awaited rank once

    def problem(self) -> str | None:
        return _int_problem("rank", self.rank, 1)  # rank 0 is the listener


@dataclass(frozen=True, slots=True)
class Ready:
    """Rank r is built: engine_id as it holds it after the sync with rank 0 (/info lists it per rank);
    the side channel is its own connector's (None without one), advertised to decode (tp_connector.py)."""

    engine_id: str
    side_channel_port: int | None
    side_channel_host: str | None

    def problem(self) -> str | None:
        return _first(None if isinstance(self.engine_id, str) and self.engine_id else
                      f"engine_id is {describe(self.engine_id)}, not a non-empty str",
                      None if self.side_channel_port is None else
                      _int_problem("side_channel_port", self.side_channel_port, 1, MAX_PORT),
                      None if self.side_channel_host is None or
                      (isinstance(self.side_channel_host, str) and self.side_channel_host) else
                      f"side_channel_host is {describe(self.side_channel_host)}, not a non-empty str or None")


@dataclass(frozen=True, slots=True)
class Reply:
    value: object  # what the connector call returned: the call's reply_problem checks it where it is awaited

    def problem(self) -> str | None:
        return None


@dataclass(frozen=True, slots=True)
class RankFailed:
    message: str

    def problem(self) -> str | None:
        return _type_problem("message", self.message, str, "a str")


ConnectorCall: TypeAlias = (StartLoad | RequestFinished | GetFinished | AbortLoad | ReleaseUnloaded | ReleaseHeld
                             | ForgetEngine)
Message: TypeAlias = Execute | ConnectorCall | Shutdown | Setup | Hello | Ready | Reply | RankFailed
# The step message first: isinstance walks the tuple in order.
MESSAGE_TYPES: Final = (Execute, GetFinished, StartLoad, RequestFinished, AbortLoad, ReleaseUnloaded, ReleaseHeld,
                        ForgetEngine, Reply, Shutdown, Setup, Hello, Ready, RankFailed)


def describe(arrived: object) -> str:
    """What arrived, short enough for one log line."""
    return f"{type(arrived).__name__} {short(arrived)}"


def short(arrived: object) -> str:
    """repr(arrived), cut to 120 characters."""
    text = repr(arrived)
    return f"{text[:120]}{'...' if len(text) > 120 else ''}"
