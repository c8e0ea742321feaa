"""Files exchanged with a program that polls them: written atomically, read tolerantly.

Harvester and ARC read the pilot's files on their own schedule and write theirs
without any locking (Harvester writes ``HPCJobs.json`` and ``JobsEventRanges.json``
with a plain ``open``/``json.dump``), so both directions need care:

* **writing**: a temporary file in the same directory, fsync'ed, renamed over the name,
  then the directory fsync'ed: a reader sees the old file or the new one, never half of
  one, and a pilot killed at any point leaves at most a ``.<name>.*.tmp`` file that no
  reader looks at (``remove_leftovers`` clears them when the next pilot starts);
* **reading**: a file that is missing, half-written or not the expected JSON type is
  "not there yet", never an error: the caller looks again at its next poll.

``poll`` waits for a condition on the reactor clock at a fixed interval (no threads
held, no busy loop); the blocking file calls themselves run in the pilot's thread pool,
since the shared file systems of HPC centres can stall.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from pilot.util.files import write_bytes_atomically

T = TypeVar("T")

#: The largest file the pilot reads from the other side (a job definition with many files).
MAX_READ = 64 << 20


def write_json(path: Path, document: object, mode: int = 0o644) -> None:
    """``document`` as ``path``, atomically and durably (blocking)."""
    data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")
    write_bytes_atomically(path, data, durable=True, mode=mode)
    sync_directory(path.parent)


def sync_directory(directory: Path) -> None:
    """fsync ``directory``, so that a rename in it survives a crash of the node."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_json(path: Path, kind: type[T]) -> T | None:
    """The JSON document in ``path`` if it is complete and a ``kind``; else None (blocking).

    None covers: no such file, a file being written (truncated JSON), a file too large,
    and a document of another type.  A symbolic link or other non-regular file is refused
    (None) as well: the other side writes plain files.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        with os.fdopen(descriptor, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_READ:
                return None
            data = handle.read(MAX_READ + 1)
    except OSError:
        return None
    try:
        document = json.loads(data)
    except ValueError:
        return None
    return document if isinstance(document, kind) else None


def exists(path: Path) -> bool:
    return os.path.lexists(path)


def remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def rename_read(path: Path) -> None:
    """``path`` → ``path.read``: taken, and never read again by this pilot (blocking)."""
    try:
        os.replace(path, path.with_name(path.name + ".read"))
    except FileNotFoundError:
        pass


def remove_leftovers(directory: Path, names: list[str]) -> int:
    """Remove temporary files a killed pilot left for ``names``; how many (blocking)."""
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        if entry.name.endswith(".tmp") and any(entry.name.startswith(f".{n}.") for n in names):
            remove(Path(entry.path))
            removed += 1
    return removed


async def poll(
    clock: IReactorTime,
    interval: float,
    timeout: float | None,
    look: Callable[[], Awaitable[T | None]],
) -> T | None:
    """``look()`` now and every ``interval`` s until it returns something; None after ``timeout``.

    Cancelling the caller's Deferred cancels the wait between two looks.
    """
    started = clock.seconds()
    while True:
        found = await look()
        if found is not None:
            return found
        if timeout is not None and clock.seconds() - started >= timeout:
            return None
        await deferLater(clock, interval, lambda: None)


def flat(document: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``document`` without null values (the other side reads absent, not null)."""
    return {key: value for key, value in document.items() if value is not None}
