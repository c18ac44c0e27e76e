"""log_dir must be a directory serve can create or write in: found before any process starts,
instead of a FileExistsError traceback from the launcher.
"""

from __future__ import annotations

import os
from pathlib import Path

from pdlaunch.config.problems import Problem, problem

_FIX = "pass --log-dir DIR (or set log_dir) to a directory you can write"


def log_dir_problems(log_dir: str) -> list[Problem]:
    """Problems with `log_dir` as the launcher uses it (created with its parents, then written)."""
    if not log_dir.strip():
        return [problem("log_dir", "is empty", _FIX)]
    path = Path(log_dir)
    if path.exists():
        if not path.is_dir():
            return [problem("log_dir", f"{log_dir!r} exists and is a file, not a directory",
                            f"remove the file or {_FIX}")]
        if not os.access(path, os.W_OK | os.X_OK):
            return [problem("log_dir", f"{log_dir!r} is not writable by this user", _FIX)]
        return []
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return [problem("log_dir", f"{log_dir!r} cannot be created: {str(parent)!r} is a file", _FIX)]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [problem("log_dir", f"{log_dir!r} cannot be created: {str(parent)!r} is not writable by this user",
                        _FIX)]
    return []
