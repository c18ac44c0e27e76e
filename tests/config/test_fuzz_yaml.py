"""Random YAML documents only ever produce validation results: exit 0 or 1, never a traceback."""

from __future__ import annotations

import json
import tempfile
import typing
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.errors_format import _model_in, all_key_paths
from tests.config.cli_helpers import check

REAL_KEYS = sorted({p.replace("[]", "").rsplit(".", 1)[-1] for p in all_key_paths()})
REAL_VALUES = ["demo", "cpu", "cuda", "auto", "prefill", "decode", "colocated", "nixl", "storage", "push",
               "pull", "bfloat16", "float16", "float32", "round_robin", "", "/", ".", "~nosuchuser/x"]

keys = st.one_of(st.sampled_from(REAL_KEYS), st.text(max_size=12), st.integers(-3, 3), st.booleans())
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 70000), st.integers(), st.floats(allow_nan=True),
    st.sampled_from(REAL_VALUES), st.text(max_size=20),
)
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=6)),
    max_leaves=25,
)


def _plausible(annotation: Any) -> st.SearchStrategy[Any]:
    """Values of the field's own type, mostly in range, so that documents get past type checks."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return st.sampled_from(args)
    if args and typing.get_origin(annotation) is not list:
        return st.one_of(*[_plausible(a) for a in args])
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.one_of(st.integers(0, 8), st.sampled_from([16, 128, 512, 2048, 8000, 8100, 65535, 70000]))
    if annotation is float:
        return st.floats(0, 2, allow_nan=False)
    if annotation is str:
        return st.sampled_from(REAL_VALUES)
    if typing.get_origin(annotation) is list:
        return st.lists(st.integers(-1, 9), max_size=4)
    return scalars


def _shaped(model: type[BaseModel], wild: bool) -> st.SearchStrategy[dict[str, Any]]:
    """Documents with the config's own shape (real keys per section, random leaves), to reach deep rules."""
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for name, info in model.model_fields.items():
        child = _model_in(info.annotation)
        if child is None:
            fields[name] = st.one_of(_plausible(info.annotation), scalars) if wild else _plausible(info.annotation)
        elif typing.get_origin(info.annotation) is list:
            fields[name] = st.lists(st.deferred(lambda child=child: _shaped(child, wild)), max_size=3)
        else:
            fields[name] = st.deferred(lambda child=child: _shaped(child, wild))
    return st.fixed_dictionaries({}, optional=fields)


top_level = st.one_of(
    st.dictionaries(st.sampled_from(REAL_KEYS + ["instances", "model"]), documents, max_size=6),
    _shaped(DeploymentConfig, wild=False),
    _shaped(DeploymentConfig, wild=True),
    documents,
)


def _dump(doc: Any) -> str:
    return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=top_level, raw_tail=st.one_of(st.just(""), st.text(max_size=10)), device=st.sampled_from(["cpu", "auto"]))
def test_random_yaml_only_gives_validation_results(doc: Any, raw_tail: str, device: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "random.yaml"
        path.write_text(_dump(doc) + raw_tail, encoding="utf-8")
        result = check([str(path), "--device", device, "--json"])
        assert result.exit_code in (0, 1), result.output
        report = json.loads(result.stdout)
        assert report["valid"] == (result.exit_code == 0)
        assert all(set(p) == {"field", "message"} and p["field"] for p in report["problems"])
