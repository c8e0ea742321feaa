"""The pilot's journal: what it did, one fsync'ed JSON line per event, so a successor can go on.

A pilot can die at any moment (SIGKILL after a batch system's grace, the OOM killer, a
node reboot).  Everything a successor started on the same work area needs to finish
the dead pilot's jobs goes into the journal *before* the pilot relies on it: the job
it acquired, its phases, the payload it started (pid and start time), how the payload
ended, each transfer (size, checksum, where), each server update sent and
acknowledged.  ``interfaces/journal.schema.json`` describes the entries.

Layout: ``<base>/journal/<stem>.jsonl`` per pilot, with the job definitions it took in
``<base>/journal/<stem>/`` (mode 0600: a definition can carry a job's secrets, and the
job's own directory is the payload's).  A live pilot holds an exclusive ``flock`` on
its journal for its whole life; a journal whose lock can be taken belongs to a pilot
that is gone (``claim_orphans``).  A pilot that ends normally removes its journal.

Writes: entries are appended in order with ``O_APPEND`` and made durable with one
``fsync`` for everything queued meanwhile (group commit), in the pilot's thread pool,
never on the reactor.  ``append`` returns a Deferred that fires when the entry is on
disk.  Reading tolerates a torn last line (a crash mid-write).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from pilot.util.threads import ThreadRunner

#: The journal's format version (``v`` of the first entry).
VERSION = 1

JOURNAL_DIR = "journal"


def journal_dir(base: Path) -> Path:
    return base / JOURNAL_DIR


class Journal:
    """One pilot's journal (see the module docstring)."""

    def __init__(self, path: Path, in_thread: ThreadRunner, *, wall: Callable[[], float] = time.time) -> None:
        self.path = path
        self._in_thread = in_thread
        self._wall = wall
        self._fd: int | None = None
        self._seq = 0
        self._queued: list[tuple[bytes, Deferred[None]]] = []
        self._writing = False
        self._drain_waiters: list[Deferred[None]] = []
        self.entries_written = 0
        self.fsyncs = 0

    @property
    def files_dir(self) -> Path:
        """Where this pilot keeps the job definitions it took (0700)."""
        return self.path.with_suffix("")

    def open(self) -> None:
        """Create the journal (0600), take its lock and keep it (blocking file work: call in a thread)."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    def append(self, kind: str, **fields: Any) -> Deferred[None]:
        """Queue one entry; the Deferred fires once it (and all before it) is on disk."""
        if self._fd is None:
            raise RuntimeError("the journal is not open")
        self._seq += 1
        entry = {"seq": self._seq, "t": round(self._wall(), 3), "kind": kind, **fields}
        line = json.dumps(entry, separators=(",", ":"), sort_keys=False).encode("utf-8") + b"\n"
        done: Deferred[None] = Deferred()
        self._queued.append((line, done))
        self._flush()
        return done

    def _flush(self) -> None:
        if self._writing or not self._queued:
            return
        batch, self._queued = self._queued, []
        self._writing = True
        fd = self._fd
        assert fd is not None
        written = self._in_thread(_write_and_sync, fd, b"".join(line for line, _ in batch))
        written.addBoth(self._written, batch)

    def _written(self, result: object, batch: list[tuple[bytes, Deferred[None]]]) -> None:
        self._writing = False
        self.fsyncs += 1
        self.entries_written += len(batch)
        for _, done in batch:
            if isinstance(result, Failure):
                done.errback(result)
            else:
                done.callback(None)
        self._flush()
        if not self._writing:
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def drained(self) -> Deferred[None]:
        """Fires when everything appended so far is on disk."""
        if not self._writing and not self._queued:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._drain_waiters.append(waiter)
        return waiter

    def close(self, *, remove: bool) -> None:
        """Release the lock; ``remove`` the journal (and its files) when every job is done."""
        if self._fd is None:
            return
        if remove:
            _remove_journal(self.path)
        os.close(self._fd)
        self._fd = None


def _write_and_sync(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    os.fsync(fd)


def _remove_journal(path: Path) -> None:
    files = path.with_suffix("")
    if files.is_dir():
        for item in files.iterdir():
            item.unlink(missing_ok=True)
        files.rmdir()
    path.unlink(missing_ok=True)


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The entries of a journal, in order; a torn or unreadable line is skipped."""
    entries: list[dict[str, Any]] = []
    try:
        data = path.read_bytes()
    except OSError:
        return entries
    for line in data.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("kind"), str):
            entries.append(entry)
    return entries


class ClaimedJournal:
    """A dead pilot's journal, locked by this pilot until ``release``."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @property
    def files_dir(self) -> Path:
        return self.path.with_suffix("")

    def entries(self) -> list[dict[str, Any]]:
        return read_journal(self.path)

    def release(self, *, remove: bool) -> None:
        if self._fd is None:
            return
        if remove:
            _remove_journal(self.path)
        os.close(self._fd)
        self._fd = None


def claim_orphans(base: Path, own: Path | None = None) -> Iterator[ClaimedJournal]:
    """The journals in ``base/journal`` whose pilot is gone, each locked for this pilot.

    A journal is a dead pilot's when its ``flock`` can be taken: a live pilot holds its
    own for as long as it runs, and the kernel releases it when the process dies,
    however it dies.  Blocking file work: call in a thread.
    """
    directory = journal_dir(base)
    try:
        candidates = sorted(directory.glob("*.jsonl"))
    except OSError:
        return
    for path in candidates:
        if own is not None and path == own:
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        yield ClaimedJournal(path, fd)


def journal_name(host: str, pid: int, started: float) -> str:
    """A journal's file name: unique per pilot on a shared work area."""
    safe_host = "".join(c if c.isalnum() or c in "-." else "_" for c in host)[:64] or "host"
    return f"pilot-{safe_host}-{pid}-{int(started * 1000)}.jsonl"
