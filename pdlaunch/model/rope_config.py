"""Rope as config.json gives it, in either dialect: transformers 4.x (`rope_theta` + `rope_scaling`) and 5.x
(`rope_parameters`). `RopeScaling` is what model/rotary.py computes the frequencies from; rotary.py rotates whole
heads, so a `partial_rotary_factor` other than 1 is refused."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pdlaunch.errors import PdlaunchError, error_text

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# rotary.py divides by each of these: 0 made every position's rotation inf/NaN, a negative one nonsense
RopeFactor = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class RopeScaling(BaseModel):
    """Scaled rope as config.json gives it: `linear` (factor) or `llama3` (factor, low/high_freq_factor,
    original_max_position_embeddings, else config.json's top-level one, else the model's max_position_embeddings)."""

    model_config = ConfigDict(frozen=True)

    rope_type: Literal["linear", "llama3"]
    factor: RopeFactor
    low_freq_factor: RopeFactor | None = None
    high_freq_factor: RopeFactor | None = None
    original_max_position_embeddings: RopeFactor | None = None

    @model_validator(mode="after")
    def _llama3_needs_its_factors(self) -> RopeScaling:
        if self.rope_type == "llama3" and (self.low_freq_factor is None or self.high_freq_factor is None):
            raise ValueError("llama3 rope scaling needs low_freq_factor and high_freq_factor")
        return self


def rope(cfg: Mapping[str, object], default_theta: float) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling dict or None) from either config dialect; `default_theta` where neither gives one.
    A `rope_scaling` beside `rope_parameters` wins, as in transformers 5 (convert_rope_params_to_dict: `rope_scaling
    or rope_parameters`) and 4.x (which reads no rope_parameters): e.g. the YaRN rope_scaling Qwen's model cards
    say to add to config.json, added to a config.json transformers 5 wrote."""
    params, legacy = cfg.get("rope_parameters"), cfg.get("rope_scaling")
    if isinstance(params, dict) and not legacy and any(isinstance(v, dict) for v in params.values()):
        # Per-layer-type rope parameters (not used by the supported families), nested under layer types. A flat dict
        # without rope_type, {"rope_theta": 1000000.0}, is plain rope, as transformers 5 reads it (it was refused as
        # "per-layer").
        raise PdlaunchError("per-layer rope_parameters are not supported", field="config.json:rope_parameters")
    key = "rope_parameters" if params is not None and not legacy else "rope_scaling"
    found = params if key == "rope_parameters" else legacy or {}
    if not isinstance(found, dict):  # a string or list was silently plain rope (rope_parameters) or a traceback
        raise PdlaunchError(f"{key} {found!r} is not a JSON object", field=f"config.json:{key}",
                            hint="use the checkpoint's original config.json")
    scaling = dict(found)
    _whole_head_rotated(cfg, scaling, key)
    theta = positive_float(scaling.pop("rope_theta", cfg.get("rope_theta")), "rope_theta", default_theta)
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise PdlaunchError(
            f"rope type {rope_type!r} is not supported",
            field=f"config.json:{key}",
            hint=f"supported rope types: {', '.join(SUPPORTED_ROPE_TYPES)}",
        )
    if rope_type == "default":
        return theta, None
    known = {k: v for k, v in scaling.items() if k in RopeScaling.model_fields}
    if rope_type == "llama3":
        _top_level_original_context(cfg, known, key)
    try:
        return theta, RopeScaling.model_validate({**known, "rope_type": rope_type})
    except ValidationError as exc:
        error = exc.errors()[0]
        what = error_text(error)
        if error["loc"]:  # the factor named, with its value unless it is absent
            what = f"{error['loc'][0]} is missing" if error["type"] == "missing" else \
                f"{error['loc'][0]} {error['input']!r}: {what}"
        raise PdlaunchError(f"rope scaling {rope_type!r}: {what}", field=f"config.json:{key}",
                            hint="the checkpoint's config.json rope parameters are incomplete or invalid") from None


def _top_level_original_context(cfg: Mapping[str, object], known: dict[str, object], key: str) -> None:
    """A top-level `original_max_position_embeddings` beside llama3 rope parameters: transformers 5 takes it over
    the one in the rope parameters (standardize_rope_params), transformers 4.x read only the rope parameters' own.
    Given alone it is the llama3 old context (it was max_position_embeddings here: other frequencies than
    transformers'); given with a different value inside, the two readings disagree and it is refused."""
    given = cfg.get("original_max_position_embeddings")
    if given is None:
        return
    top = positive_float(given, "original_max_position_embeddings", 0.0)
    inner = known.get("original_max_position_embeddings")
    if inner is None:
        known["original_max_position_embeddings"] = top
    elif inner != top:
        raise PdlaunchError(f"original_max_position_embeddings is {given!r} at the top level of config.json and "
                            f"{inner!r} in {key}: transformers 5 uses the first, 4.x the second",
                            field="config.json:original_max_position_embeddings",
                            hint=f"keep the one the model was trained with, in {key}, and remove the other")


def _whole_head_rotated(cfg: Mapping[str, object], scaling: Mapping[str, object], key: str) -> None:
    """Refuse a partial_rotary_factor other than 1 (in the rope parameters or beside them, as transformers reads
    it): rotary.py rotates every dimension of a head, and vLLM rotates only that fraction of it for these
    families, so serving it would give other logits than vLLM without any error."""
    for field, source in ((key, scaling), ("partial_rotary_factor", cfg)):
        if source.get("partial_rotary_factor") is None:
            continue
        value = source["partial_rotary_factor"]
        if isinstance(value, bool) or not isinstance(value, int | float) or value != 1:
            raise PdlaunchError(f"partial_rotary_factor {value!r} rotates only part of each head, which pdlaunch "
                                "does not implement (it rotates all head_dim dimensions)",
                                field=f"config.json:{field}",
                                hint="only checkpoints that rotate whole heads (partial_rotary_factor 1.0 or "
                                     "absent) load")
        return  # the rope parameters' own value wins over the top-level one, as in transformers


def positive_float(value: object, key: str, default: float) -> float:
    """A config.json number above 0 (absent or null: `default`)."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
        raise PdlaunchError(f"{key} {value!r} is not a positive number", field=f"config.json:{key}",
                            hint="use the checkpoint's original config.json")
    return float(value)
