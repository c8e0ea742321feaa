"""An in-process stand-in for PanDA's Adder daemon.

On the real server a ``finished``/``failed`` update is stored as ``holding`` with the
job output report, and the Adder (``daemons/scripts/add_main.py`` running
``dataservice/adder_gen.py``) later parses the report and sets the final state.  The
development server runs the same decision right after the final update: a finished job
whose report does not cover every output and the log file (whose GUID must be the
``logGUID`` handed out) becomes ``failed``, with the Adder's error codes.

Pure functions: they run inside the store's transaction (no reactor, no logging).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from pilot.devserver.jobdef import split_list
from pilot.devserver.store import JobRecord

#: ``dataservice/ErrorCode.py``
EC_ADDER = 200
EC_INCONSISTENT_GUID = 205
REPORT_ERROR_DIAG = "Could not get GUID/LFN/MD5/FSIZE/SURL from pilot JSON"


@dataclass(frozen=True)
class AdderOutcome:
    status: str | None
    diag: str | None = None


def decide_adder(
    job: JobRecord | None, reported: str, now: float
) -> tuple[Mapping[str, object], AdderOutcome]:
    """The Adder daemon for one job: parse the job output report and set the final state."""
    if job is None or job.jobStatus != "holding":
        return {}, AdderOutcome(None)
    wire = job.definition
    outputs = split_list(wire.get("outFiles"))
    log_file = str(wire.get("logFile"))
    inputs = set(split_list(wire.get("inFiles")))
    allowed_missing = set(split_list(wire.get("allowNoOutput")))
    status = reported
    changes: dict[str, object] = {}
    diag: str | None = None
    try:
        entries = parse_job_output_report(job.jobOutputReport, inputs)
    except ReportError as exc:
        status = "failed"
        diag = str(exc)
        if job.pilotErrorCode in (0, None) and job.transExitCode in (0, None):
            changes.update({"ddmErrorCode": EC_ADDER, "ddmErrorDiag": REPORT_ERROR_DIAG})
    else:
        known = inputs | set(outputs)
        unknown = [lfn for lfn in entries if lfn not in known]
        if status == "finished":
            for lfn in outputs:
                if lfn not in entries and lfn not in allowed_missing:
                    status, diag = "failed", f"expected output {lfn} is missing in pilot JSON"
                    changes.update({"ddmErrorCode": EC_ADDER, "ddmErrorDiag": diag})
                    break
        if status == "finished" and log_file in entries and entries[log_file] != wire.get("logGUID"):
            status = "failed"
            diag = f"GUID {entries[log_file]} of log file {log_file} is not the logGUID {wire.get('logGUID')} of the job"
            changes.update({"ddmErrorCode": EC_INCONSISTENT_GUID, "ddmErrorDiag": diag})
        if unknown:
            status, diag = "failed", f"pilot produced {unknown[0]} inconsistently with jobdef"
            changes.update({"ddmErrorCode": EC_ADDER, "ddmErrorDiag": diag})
    changes.update({"jobStatus": status, "adderDiag": diag, "modificationTime": now, "stateChangeTime": now})
    if status == "finished":
        changes["jobDispatcherErrorDiag"] = None
    return changes, AdderOutcome(status, diag)


class ReportError(ValueError):
    """The job output report cannot be used (the Adder's "Issue with parsing Job Output Report")."""


def parse_job_output_report(report: str | None, inputs: set[str]) -> dict[str, str]:
    """LFN -> GUID of a job output report, with the checks of ``parse_job_output_report``."""
    if not report:
        raise ReportError("Job Output Report is empty")
    try:
        document = json.loads(report)
        if not isinstance(document, dict):
            raise TypeError(f"expected a JSON object, got {type(document).__name__}")
        guids: dict[str, str] = {}
        for lfn, entry in document.items():
            if not isinstance(entry, dict):
                raise TypeError(f"entry for {lfn} is not an object")
            guid = str(entry["guid"])
            fsize = int(entry["fsize"]) if "fsize" in entry else None
            md5sum = str(entry["md5sum"]) if "md5sum" in entry else None
            if md5sum is not None and re.search("^[a-fA-F0-9]{32}$", md5sum) is None:
                md5sum = None
            adler32 = str(entry["adler32"]) if "adler32" in entry else None
            if lfn not in inputs and (fsize is None or (md5sum is None and adler32 is None)):
                raise ValueError(f"fsize/md5sum/adler32/surl=None for {lfn}")
            guids[str(lfn)] = guid
    except (ValueError, TypeError, KeyError) as exc:
        detail = f"{type(exc).__name__} {exc}"
        raise ReportError(f"Issue with parsing Job Output Report: {detail}") from None
    return guids
