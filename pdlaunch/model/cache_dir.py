"""Where built and converted checkpoints are kept between runs (the demo model, converted GGUF files)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$PDLAUNCH_CACHE_DIR`, else `~/.cache/pdlaunch`."""
    override = os.environ.get("PDLAUNCH_CACHE_DIR")
    return Path(override).expanduser() if override else Path.home() / ".cache" / "pdlaunch"
