"""The per-job transfer record: one JSON line per finished transfer, fsync'ed.

It lives outside the pilot's own directory (``<base>/transfer-records/``), named
by PandaID and attempt, so that a pilot restarted on the same slot can tell which
inputs it already has (same size and checksum, still on disk) and which outputs
already reached storage (same checksum) — and skip them instead of copying again or
failing with "file exists".  Writes happen in a thread: fsync can take a while.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pilot.util.records import record
from pilot.util.threads import ThreadRunner


@record(frozen=True)
class RecordEntry:
    direction: str
    lfn: str
    scope: str
    size: int | None
    adler32: str | None
    tool: str
    remote: str
    endpoint: str
    local: str
    seconds: float
    time: float


class TransferRecord:
    def __init__(self, path: Path, in_thread: ThreadRunner) -> None:
        self.path = path
        self._in_thread = in_thread

    @classmethod
    def for_job(
        cls, base: Path, panda_id: int, attempt_nr: int | None, in_thread: ThreadRunner
    ) -> TransferRecord:
        return cls(base / "transfer-records" / f"PanDA-{panda_id}-{attempt_nr or 0}.jsonl", in_thread)

    def load(self) -> dict[tuple[str, str], RecordEntry]:
        """Entries by (direction, lfn); a torn last line (a crash mid-write) is ignored."""
        entries: dict[tuple[str, str], RecordEntry] = {}
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return entries
        for line in lines:
            try:
                raw: dict[str, Any] = json.loads(line)
                entry = RecordEntry(**raw)
            except (ValueError, TypeError):
                continue
            entries[(entry.direction, entry.lfn)] = entry
        return entries

    #: Told of every entry once it is on disk (the pilot's journal keeps each transfer too).
    on_append: Callable[[RecordEntry], object] | None = None

    async def append(self, entry: RecordEntry) -> None:
        await self._in_thread(self._append_sync, json.dumps(asdict(entry), sort_keys=True))
        if self.on_append is not None:
            self.on_append(entry)

    def _append_sync(self, line: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, (line + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
