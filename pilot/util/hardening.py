"""Keeping the pilot's secrets out of reach of a payload that runs under the pilot's uid.

A payload run without a container is a child of the pilot, with the pilot's uid.  Linux
lets a process read ``/proc/<pid>/environ``, ``mem``, ``fd/``, ``maps`` of any other
process of its uid, and ``/proc/<pid>/cmdline`` of every process: ``cat
/proc/$PPID/environ`` showed the pilot's S3 keys and the paths of its proxy and token.
Three measures, for the pilot to take at start-up once its configuration is read:

``make_undumpable``
    ``prctl(PR_SET_DUMPABLE, 0)``: ``environ``, ``mem``, ``fd/``, ``maps``... become
    owned by root and ptrace is refused, for every process without ``CAP_SYS_PTRACE``
    (the pilot itself keeps access to its own files except ``environ``).  No core dumps
    either.  ``execve`` resets the flag, so payloads stay dumpable (prmon can read them).
    ``cmdline`` and ``status`` stay readable: see ``hide_argv_values``.

``scrub_environment``
    removes the credential variables (``pilot.util.secrets.CREDENTIAL_VARIABLES``) from
    ``os.environ`` once they have been read, so that nothing the pilot spawns without an
    explicit environment inherits them.  Removing a variable from ``os.environ`` does not
    remove it from ``/proc/<pid>/environ``: the kernel shows the block of memory the
    environment was handed over in at ``execve``, whatever the C library's ``environ``
    points to now.  So the entries are also overwritten in that block.

``hide_argv_values``
    overwrites given values wherever they occur in the process's argument block, which
    ``/proc/<pid>/cmdline`` shows to every user.  The pilot's own options take paths, not
    secrets (``--token-file``, not a token), so today nothing should match; the pilot
    calls it with the values it knows so that a wrapper passing a secret on the command
    line does not publish it.  ``sys.argv`` keeps the original (Python copied it).

The two block rewrites find the blocks through ``/proc/self/stat`` (``arg_start`` ..
``env_end``, Linux >= 3.5) and write them with ``ctypes``; elsewhere they do nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Iterable, MutableMapping

from pilot.util.secrets import CREDENTIAL_VARIABLES, name_matches

PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4

#: Field numbers (1-based, ``proc(5)``) of the argument and environment blocks' bounds.
_ARG_START, _ARG_END, _ENV_START, _ENV_END = 48, 49, 50, 51
#: Larger "blocks" are not believed (the kernel limits both to a quarter of the stack limit).
_MAX_BLOCK = 64 << 20


@functools.cache
def _load_libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _libc() -> ctypes.CDLL | None:
    """The C library, on Linux (elsewhere the process blocks and ``prctl`` differ)."""
    return _load_libc() if sys.platform.startswith("linux") else None


def make_undumpable() -> str | None:
    """Make the pilot's ``/proc`` entries unreadable to other processes of its uid.

    None when done; otherwise why not (the pilot goes on: this is defence in depth, and
    a site that needs the separation runs payloads in a container or under another uid).
    """
    libc = _libc()
    if libc is None:
        return f"prctl(PR_SET_DUMPABLE) is Linux-only, this is {sys.platform}"
    if libc.prctl(ctypes.c_int(PR_SET_DUMPABLE), ctypes.c_ulong(0), 0, 0, 0) != 0:
        return f"prctl(PR_SET_DUMPABLE, 0) failed: {os.strerror(ctypes.get_errno())}"
    return None


def is_dumpable() -> bool | None:
    """Whether the process is dumpable (None if that cannot be asked here)."""
    libc = _libc()
    if libc is None:
        return None
    return bool(libc.prctl(ctypes.c_int(PR_GET_DUMPABLE), 0, 0, 0, 0))


def _block(start_field: int, end_field: int) -> tuple[int, bytes] | None:
    """(address, contents) of one of the process's argument or environment blocks."""
    if _libc() is None:
        return None
    try:
        with open("/proc/self/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: count from after it
    fields = stat[stat.rindex(b")") + 2 :].split()
    try:
        start, end = int(fields[start_field - 3]), int(fields[end_field - 3])
    except (IndexError, ValueError):
        return None
    if not 0 < start < end or end - start > _MAX_BLOCK:
        return None
    return start, ctypes.string_at(start, end - start)


def _entries(block: bytes) -> Iterable[tuple[int, bytes]]:
    """(offset, entry) of each NUL-terminated entry of a block."""
    offset = 0
    for entry in block.split(b"\0"):
        if entry:
            yield offset, entry
        offset += len(entry) + 1


def _wipe_environment_entries(names: set[str]) -> int:
    """Zero the initial-environment entries of ``names`` that the C library no longer uses."""
    found = _block(_ENV_START, _ENV_END)
    libc = _libc()
    if found is None or libc is None:
        return 0
    getenv = libc.getenv
    getenv.restype = ctypes.c_void_p
    getenv.argtypes = [ctypes.c_char_p]
    address, block = found
    wiped = 0
    for offset, entry in _entries(block):
        name = entry.partition(b"=")[0]
        # a name still set points into this block or elsewhere: never pull it from under libc
        if os.fsdecode(name) in names and getenv(name) is None:
            ctypes.memset(address + offset, 0, len(entry))
            wiped += 1
    return wiped


def scrub_environment(
    environ: MutableMapping[str, str], names: Iterable[str] = CREDENTIAL_VARIABLES
) -> dict[str, str]:
    """Remove the variables matching ``names`` (globs, case-insensitive) from ``environ``.

    Returns what was removed: the pilot keeps it for its own use (its environment
    snapshot, ``SecretValues.add_environment``).  When ``environ`` is ``os.environ``,
    the entries are also erased from the process's initial environment block, which is
    what ``/proc/<pid>/environ`` shows.
    """
    patterns = tuple(names)
    removed = {name: environ.pop(name) for name in list(environ) if name_matches(name, patterns)}
    if environ is os.environ and removed:
        _wipe_environment_entries(set(removed))
    return removed


def hide_argv_values(values: Iterable[str]) -> int:
    """Overwrite each of ``values`` with ``*`` in the process's argument block.

    Returns how many occurrences were overwritten.  Values are matched as bytes (file
    system encoding), anywhere in an argument (``--key=VALUE`` included).
    """
    found = _block(_ARG_START, _ARG_END)
    if found is None:
        return 0
    address, block = found
    hidden = 0
    for value in {os.fsencode(v) for v in values if v}:
        if b"\0" in value:
            continue
        start = block.find(value)
        while start >= 0:
            ctypes.memmove(address + start, b"*" * len(value), len(value))
            hidden += 1
            start = block.find(value, start + len(value))
    return hidden
