"""FP8 checkpoints of one tiny random Qwen3 (hidden 256, head_dim 128): (served dir, float32 reference dir)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.conftest import make_engine  # noqa: F401 (fixture)
from tests.helpers.fp8_checkpoints import make_fp8_qwen3
from tests.tp.conftest import make_tp_engine  # noqa: F401 (fixture)


@pytest.fixture(scope="session")
def fp8_ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("fp8")
    return {scheme: make_fp8_qwen3(root, scheme) for scheme in ("block", "channel", "tensor", "online")}
