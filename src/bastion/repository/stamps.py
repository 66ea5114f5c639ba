"""Stat signatures: how the repository notices changed files without reading them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

Stamp = tuple[Any, ...]  # compared, never interpreted


def file_stamp(path: Path | str) -> Stamp | None:
    """(inode, size, mtime) of a file, or None when it does not exist or cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)
