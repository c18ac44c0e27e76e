from __future__ import annotations

import pytest

from pdlaunch.config import validate


@pytest.fixture(autouse=True)
def _clean_config_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No inherited allocator settings, and the 'logged once' memory starts empty in every test."""
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.setattr(validate, "_logged_once", set())
