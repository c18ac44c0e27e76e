from __future__ import annotations

import pytest

from pdlaunch.config import validate


@pytest.fixture(autouse=True)
def _clean_config_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No inherited allocator settings, and the 'logged once' memory starts empty in every test."""
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(validate, "_logged_once", set())
