"""ARC (NorduGrid) files as the job source and reporter.

Under ARC, the CE (or aCT on its behalf) gets the job from PanDA and ships it with the
pilot as ``pandaJobData.out``; the pilot needs no server connection, the CE stages the
job's inputs in before and its outputs out after the batch job, and aCT forwards the
pilot's state to PanDA from ``heartbeat.json``.  ``ArcSource`` is that exchange behind
``IJobSource`` and ``IJobReporter``:

* the job is read once from the job file (the ``getJob`` answer URL-encoded, as aCT
  writes it, or JSON: ``{PandaID: job}`` or the job itself); after it, there is no
  further job (one job per batch job, as ARC's model has it);
* every update rewrites ``heartbeat.json`` atomically: the legacy ``updateJob`` fields,
  flat, plus ``jobStatus``, with the job output report (``xml``) that aCT passes on;
* with the final update each stored output and the log are linked (or copied, across
  file systems) into the session directory under their LFNs, where the CE's output
  list expects them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from pilot.interfaces import IJobReporter, IJobSource
from pilot.logs import pilot_observer
from pilot.server.api import ApiMode
from pilot.server.messages import (
    AcquireResult,
    JobRequest,
    JobUpdate,
    StatusCode,
    UpdateResult,
    encode_job_update,
)
from pilot.source import filebox
from pilot.source.harvester import FINAL_STATES, local_path, parse_object
from pilot.util.threads import ThreadRunner

log = Logger(observer=pilot_observer)


def parse_job_file(data: bytes) -> dict[str, Any] | None:
    """The job in ``pandaJobData.out``: JSON (``{PandaID: job}`` or a job) or URL-encoded."""
    text = data.decode("utf-8", "replace").strip()
    if text.startswith("{"):
        try:
            document = json.loads(text)
        except ValueError:
            return None
        if not isinstance(document, dict):
            return None
        if "PandaID" in document:
            return document
        jobs = [(k, v) for k, v in document.items() if isinstance(v, dict) and k.isdigit()]
        if len(jobs) != 1:
            return None
        key, job = jobs[0]
        return {**job, "PandaID": job.get("PandaID", int(key))}
    fields = dict(parse_qsl(text, keep_blank_values=True))
    return fields if "PandaID" in fields else None


@implementer(IJobSource, IJobReporter)
class ArcSource:
    """See the module docstring."""

    name = "arc"

    def __init__(
        self, job_file: Path, session_dir: Path, *, in_thread: ThreadRunner, file_mode: int = 0o644
    ) -> None:
        self.job_file = job_file
        self.session_dir = session_dir
        self.heartbeat = session_dir / "heartbeat.json"
        self._in_thread = in_thread
        self._mode = file_mode
        self.calls = 0
        self._given = False

    def acquire_jobs(self, request: JobRequest) -> Deferred[AcquireResult]:
        return Deferred.fromCoroutine(self._acquire())

    async def _acquire(self) -> AcquireResult:
        self.calls += 1
        if self._given:
            return AcquireResult(StatusCode.NO_JOBS, message="ARC gives one job per batch job")
        self._given = True
        try:
            data = await self._in_thread(self.job_file.read_bytes)
        except OSError as exc:
            return AcquireResult(StatusCode.NO_JOBS, message=f"no job file {self.job_file}: {exc.strerror}")
        job = parse_job_file(data)
        if job is None:
            return AcquireResult(StatusCode.FAILED, message=f"{self.job_file} holds no job definition")
        log.info(
            "job {pandaid} from {path}", pandaid=job["PandaID"], path=str(self.job_file), event="arc.job"
        )
        return AcquireResult(StatusCode.SUCCESS, (job,))

    def update_job(self, update: JobUpdate, *, final: bool, timeout: float | None) -> Deferred[UpdateResult]:
        return Deferred.fromCoroutine(self._update(update, final))

    async def _update(self, update: JobUpdate, final: bool) -> UpdateResult:
        fields = encode_job_update(update, ApiMode.LEGACY)
        fields["jobStatus"] = update.state
        if final or update.state in FINAL_STATES:
            await self._in_thread(self._place_outputs, update)
        await self._in_thread(filebox.write_json, self.heartbeat, fields, self._mode)
        return UpdateResult(StatusCode.SUCCESS)

    def _place_outputs(self, update: JobUpdate) -> None:
        """Each stored file under its LFN in the session directory (blocking)."""
        for lfn, entry in (parse_object(update.job_output_report) or {}).items():
            source = local_path(entry.get("surl")) if isinstance(entry, dict) else None
            if source is None or os.sep in lfn or lfn in ("", ".", ".."):
                continue
            target = self.session_dir / lfn
            if target.exists():
                continue
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
