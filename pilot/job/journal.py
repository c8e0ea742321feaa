"""What a job writes in the pilot's journal (``pilot.util.journal``), as typed calls.

The entries a successor needs to finish the job if this pilot dies, each written
before the pilot relies on it:

``job.acquired``   the PanDA ID, attempt, work directory and the definition's file
                   (the definition itself is kept beside the journal, mode 0600);
``job.phase``      every phase change;
``payload.starting`` / ``payload.started`` / ``payload.ended``
                   before the spawn (so a successor that finds no ``started`` knows a
                   payload may exist), then its pid, process group, identity (start time
                   and boot id) and status file, then how it ended;
``final.sent`` / ``final.acked``
                   the final update's fields before it goes out (a successor can send
                   it again), then the server's acknowledgement: nothing more to do for
                   the job, and its final update is never sent again.

``pilot.service.resume`` reads them back.  ``interfaces/journal.schema.json`` is the
format.  A journal entry never holds a secret: the definition file is private to the
pilot and everything else is ids, states, paths and numbers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from pilot.logs import pilot_observer
from pilot.model.processes import ProcessOutcome
from pilot.process.identity import process_identity
from pilot.server.client import JobUpdate
from pilot.util.journal import Journal
from pilot.util.threads import ThreadRunner

log = Logger(observer=pilot_observer)


def definition_file(journal: Journal, panda_id: int, attempt_nr: int | None) -> Path:
    return journal.files_dir / f"job-{panda_id}-{attempt_nr or 0}.json"


def _write_private(path: Path, document: Mapping[str, Any]) -> None:
    path.parent.mkdir(mode=0o700, exist_ok=True)
    temporary = path.with_name(path.name + ".part")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(document, handle)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)


#: What a ``transfer.done`` entry keeps of a transfer record entry (no local paths).
_TRANSFER_FIELDS = ("direction", "lfn", "scope", "size", "adler32", "tool", "remote", "endpoint", "seconds")


class JobJournal:
    """One job's entries in the pilot's journal.

    A failed write (a full disk) is logged and the job goes on: the journal makes a
    successor's work possible, it must not be why the job fails.  Every method returns
    once the entry is on disk (or could not be written); none raises.
    """

    def __init__(self, journal: Journal, in_thread: ThreadRunner, panda_id: int) -> None:
        self.journal = journal
        self._in_thread = in_thread
        self.panda_id = panda_id

    def _append(self, kind: str, **fields: Any) -> Deferred[None]:
        written = self.journal.append(kind, panda_id=self.panda_id, **fields)
        written.addErrback(self._failed, kind)
        return written

    def _failed(self, failure: Failure, kind: str) -> None:
        log.failure(
            "job {pandaid}: journal entry {kind} not written",
            failure,
            pandaid=self.panda_id,
            kind=kind,
            event="journal.failed",
        )

    async def acquired(
        self, definition: Mapping[str, Any], attempt_nr: int | None, workdir: Path | None
    ) -> None:
        """The job is this pilot's: durable before anything of it starts."""
        path = definition_file(self.journal, self.panda_id, attempt_nr)
        try:
            await self._in_thread(_write_private, path, dict(definition))
        except OSError:
            log.failure("job {pandaid}: definition not kept for a successor", pandaid=self.panda_id)
            return
        await self._append(
            "job.acquired",
            attempt_nr=attempt_nr,
            definition=str(path),
            workdir=str(workdir) if workdir is not None else None,
        )

    def workdir(self, path: Path) -> Deferred[None]:
        return self._append("job.workdir", workdir=str(path))

    def scope(self, marker: str) -> Deferred[None]:
        """The marker every process of the job carries: a successor sweeps what is left by it."""
        return self._append("job.scope", marker=marker)

    def phase(self, phase: str) -> Deferred[None]:
        return self._append("job.phase", phase=phase)

    def payload_starting(self, status_file: Path) -> Deferred[None]:
        """Before the spawn, durably: a successor that finds no ``payload.started`` looks for it."""
        return self._append("payload.starting", status_file=str(status_file))

    def payload_started(
        self, pid: int, pgid: int | None, identity: Mapping[str, Any] | None, status_file: Path
    ) -> Deferred[None]:
        return self._append(
            "payload.started",
            pid=pid,
            pgid=pgid,
            identity=dict(identity) if identity is not None else None,
            status_file=str(status_file),
        )

    def payload_ended(self, outcome: ProcessOutcome) -> Deferred[None]:
        return self._append(
            "payload.ended",
            exit_code=outcome.exit_code,
            signal=outcome.signal,
            started=outcome.started,
            ended=outcome.ended,
        )

    async def copytool_started(self, pid: int, tool: str, lfn: str) -> None:
        """A copytool's process: its own session, so it outlives the pilot; a successor stops it."""
        identity = await self._in_thread(process_identity, pid)
        await self._append(
            "copytool.started",
            pid=pid,
            tool=tool,
            lfn=lfn,
            identity=identity.to_json() if identity is not None else None,
        )

    def transfer_done(self, entry: Any) -> Deferred[None]:
        """A finished transfer as the transfer record keeps it (direction, lfn, size, adler32...)."""
        fields = {k: v for k, v in asdict(entry).items() if k in _TRANSFER_FIELDS}
        return self._append("transfer.done", **fields)

    def copytool_ended(self, pid: int) -> Deferred[None]:
        return self._append("copytool.ended", pid=pid)

    def final_sent(self, state: str, update: JobUpdate) -> Deferred[None]:
        """The final update (redacted), durably, before it goes out: a successor can send it again."""
        fields = {key: value for key, value in asdict(update).items() if value is not None}
        return self._append("final.sent", state=state, fields=fields)

    def final_acked(self, state: str) -> Deferred[None]:
        return self._append("final.acked", state=state)
