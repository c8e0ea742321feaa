"""The pilot's status file: what it is doing now, readable on the node without the server.

``<pilot dir>/pilot_status.json`` is rewritten (atomically: temporary file + rename)
on every job state change and heartbeat.  Site admins ``cat`` it, or tools poll it; it
holds the current job, its state and phase, its resource use and the last transfer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred

from pilot.util.files import write_text_atomically
from pilot.util.threads import ThreadRunner

STATUS_NAME = "pilot_status.json"


class StatusFile:
    """Merges updates into one document and writes it off the reactor thread, in order."""

    def __init__(self, path: Path, in_thread: ThreadRunner) -> None:
        self.path = path
        self._in_thread = in_thread
        self._document: dict[str, Any] = {}
        self._writing: Deferred[None] | None = None
        self._dirty = False
        self._closed = False

    @property
    def document(self) -> dict[str, Any]:
        return self._document

    def update(self, **sections: Any) -> None:
        """Replace the given top-level sections (``None`` removes one) and schedule a write."""
        for key, value in sections.items():
            if value is None:
                self._document.pop(key, None)
            else:
                self._document[key] = value
        self._dirty = True
        if self._writing is None and not self._closed:
            writing = Deferred.fromCoroutine(self._flush())
            self._writing = None if writing.called else writing

    async def _flush(self) -> None:
        try:
            while self._dirty:
                self._dirty = False
                # the text is made here, on the reactor: the document may change meanwhile
                text = json.dumps(self._document, indent=1, sort_keys=True, default=str) + "\n"
                try:
                    await self._in_thread(write_text_atomically, self.path, text, durable=False)
                except OSError:
                    return  # a status file is a convenience: never fail a job for it
        finally:
            self._writing = None

    async def flushed(self) -> None:
        """Wait until everything updated so far is on disk."""
        while self._writing is not None:
            await self._writing

    async def close(self) -> None:
        """Write what is pending, then nothing more: the pilot directory is about to go.

        A write still running in a worker thread while the directory is removed could
        recreate a file in it, and the directory would stay behind.
        """
        await self.flushed()
        self._closed = True
