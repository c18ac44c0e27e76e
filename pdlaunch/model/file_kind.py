"""What a path is when it is neither a regular file nor a directory: a reader that opens a named pipe waits for a
writer, one that reads a device never ends, so each path a user gives is named as what it is before it is read."""

from __future__ import annotations

import os
import stat
from pathlib import Path

# What a path may be besides a file or a directory: reading a FIFO waits for a writer, a device never ends.
_SPECIAL = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def special_file_kind(path: Path) -> str | None:
    """"a named pipe (FIFO)", "a character device", ... when `path` (symlinks followed) is one; None when it is a
    regular file, a directory, or nothing that can be looked at (missing, a name too long for a path)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return next((name for is_kind, name in _SPECIAL if is_kind(mode)), None)
