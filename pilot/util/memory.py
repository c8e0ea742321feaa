"""The pilot process's own memory: one malloc arena for all its threads.

glibc gives each thread that allocates an arena of its own (up to eight per core: 512
on a 64-core worker node) and keeps what each arena once held.  That suits programs
whose threads allocate in parallel; the pilot's threads do short blocking calls under
Python's global lock and allocate little, so per-thread arenas only add to the
pilot's resident memory (about 0.3 MB in ``bench/pilotcost``) and to what the batch
system charges the job.  ``limit_malloc_arenas`` sets glibc's ``M_ARENA_MAX`` for this
process only: payloads and copytools are other programs and keep their defaults.

An operator who set ``MALLOC_ARENA_MAX`` for the pilot keeps that setting.  On other C
libraries (musl has no arenas) nothing changes.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

#: glibc's ``mallopt`` parameter number for the arena limit (``malloc.h``: ``M_ARENA_MAX``).
M_ARENA_MAX = -8


def is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError):
        return False


def limit_malloc_arenas(count: int = 1, environ: Mapping[str, str] = os.environ) -> bool:
    """Limit this process to ``count`` malloc arenas; True if the limit was set."""
    if count < 1:
        raise ValueError(f"a process needs at least one malloc arena, not {count}")
    if "MALLOC_ARENA_MAX" in environ or not is_glibc():
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    return bool(libc.mallopt(M_ARENA_MAX, count))
