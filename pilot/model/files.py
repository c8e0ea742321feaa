"""A job's files as the server is told about them: the job output report.

The job output report is what PanDA's Adder reads to register a job's files: a JSON
object keyed by LFN with ``guid``, ``fsize`` and ``adler32`` (or ``md5sum``) for every
output and for the log tarball, whose GUID must be the ``logGUID`` the server handed
out.  A missing or malformed report fails the job on the server side, so it is built
from facts measured on disk (``FileFacts``), never assumed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pilot.util.checksum import FileFacts
from pilot.util.records import record


@record(frozen=True)
class ReportedFile:
    """One entry of the job output report."""

    lfn: str
    guid: str
    facts: FileFacts
    path: Path
    is_log: bool = False
    surl: str = ""
    endpoint: str = ""

    def report_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"guid": self.guid, "fsize": self.facts.size, "adler32": self.facts.adler32}
        if self.surl:
            entry["surl"] = self.surl
        if self.endpoint:
            entry["endpoint"] = self.endpoint
        return entry


def job_output_report(files: Iterable[ReportedFile]) -> str:
    """The report as the server's ``xml`` / ``job_output_report`` parameter (JSON text)."""
    return json.dumps({f.lfn: f.report_entry() for f in files}, sort_keys=True)
