"""The base of every deployment config section, `StrictModel`, and the field types and bounds they share.

A section refuses keys it does not know, NaN and infinity, and a boolean where a number is wanted (YAML reads
`yes` and `on` as booleans, which pydantic would take as 1).
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator

Role = Literal["prefill", "decode", "colocated"]
Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Quantization = Literal["fp8"]


def _kv_cache_dtype_spelling(value: Any) -> Any:
    """vLLM's `fp8_e4m3` is our `fp8`; its `fp8_e5m2` is refused with the reason (any other value: the Literal's
    own error)."""
    if value == "fp8_e4m3":
        return "fp8"
    if value == "fp8_e5m2":
        raise ValueError("'fp8_e5m2' is not supported: the FP8 KV cache is e4m3 (the checkpoints' k_scale/v_scale "
                         "are for e4m3); use fp8 (or fp8_e4m3)")
    return value


KVCacheDType = Annotated[Literal["auto", "fp8"], BeforeValidator(_kv_cache_dtype_spelling)]
BLOCK_SIZES = (8, 16, 32, 64, 128)
SEED_MAX = 2**64 - 1  # seeds are unsigned 64-bit (torch.Generator.manual_seed)
MAX_GIB = 2**20  # the most GiB any size takes (1 PiB): more is a typo, and GiB x 2**30 must stay a finite float
# Upper bounds of the counts and durations that size memory or loops (a batch ladder of max_num_seqs entries, a
# timer of that many seconds): more is a typo, and a huge value would run for ever or overflow a timer.
MAX_SEQS = 2**14
MAX_TOKENS = 2**24  # tokens of one sequence, step or queue: 16M, above the longest context of any checkpoint
MAX_BLOCKS = 2**24
MAX_SECONDS = 7 * 24 * 3600  # any timeout or wait: one week
MAX_REQUEST_BYTES = 2**30
MAX_ITL_MS = 60_000
DeviceIndex = Annotated[int, Field(ge=0)]


def _admits_bool(annotation: object) -> bool:
    inner = typing.get_args(annotation)[0] if typing.get_origin(annotation) is Annotated else annotation
    return inner is bool


def _bool_read_as_number(annotation: object, value: object) -> bool:
    """Whether `value` is, or holds (in a list, or as a mapping's value), a bool where `annotation` wants an int or
    a float: pydantic would read `true` as 1."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _bool_read_as_number(args[0], value)
    if origin in (typing.Union, types.UnionType):
        if isinstance(value, bool) and any(_admits_bool(arg) for arg in args):
            return False
        return any(_bool_read_as_number(arg, value) for arg in args)
    if isinstance(value, bool):
        return annotation in (int, float)
    if origin is list and isinstance(value, list):
        return any(_bool_read_as_number(args[0], item) for item in value)
    if origin is dict and isinstance(value, dict):
        return any(_bool_read_as_number(args[1], item) for item in value.values())
    return False


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: object, info: ValidationInfo) -> object:
        if info.field_name is not None and _bool_read_as_number(cls.model_fields[info.field_name].annotation, value):
            raise ValueError("a boolean is not a number (YAML reads true, false, yes, no, on and off as booleans); "
                             "write the number")
        return value
