"""Offload tests reuse the engine fixtures (integrity checked after every test)."""

from tests.engine.conftest import make_engine  # noqa: F401  (pytest fixture)
