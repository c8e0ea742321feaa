"""Is a file system full?  The witness for failures whose own message was lost.

A process that fails on a full disk usually says "No space left on device" on a
stream that is itself written to that disk, so the message is often lost with the
space.  The free space measured right after the failure tells the story instead.
Blocking (``statvfs`` on a network file system may hang): call it in a thread.
"""

from __future__ import annotations

import shutil
from pathlib import Path

#: Less free space than this (or than what a failed step needed) counts as full.
FULL_MARGIN = 1 << 20


def is_full(path: Path, needed: int = 0) -> bool:
    """True when ``path``'s file system has less than ``needed`` bytes (at least 1 MB) free."""
    return shutil.disk_usage(path).free < max(needed, FULL_MARGIN)
