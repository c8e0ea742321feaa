"""What the payload's exit status, output tails and job report say about how it ended.

After the payload process ends, the pilot has three sources of truth: the exit status
(or the signal that killed it), the last lines the payload wrote to ``payload.stderr``
and ``payload.stdout``, and the ``jobReport.json`` a transform may leave in the work
directory.  :func:`analyse_payload` folds them into the fields of the final job update
(``exeErrorCode``, ``exeErrorDiag``, ``nEvents``, ``metaData``, ``jobMetrics``) and, when
a known failure pattern shows *why* the payload failed, a pilot error code.

Everything here is synchronous file reading and string matching: the caller runs it in
a thread so the reactor never waits on a large report.  Payloads write anything they
like, so nothing in this module trusts the files: bad input gives fewer fields, never
an exception.
"""

from __future__ import annotations

import json
import math
import re
import signal as _signal
from collections.abc import Sequence
from dataclasses import field
from pathlib import Path
from typing import TypeAlias

from pilot.errorcodes import ErrorCode
from pilot.errors import MAX_DIAG_LENGTH, error_for_signal
from pilot.util.records import record

#: One stderr/stdout pattern: the compiled regex, the pilot error it means, and a short
#: text that starts the error's detail.
StderrPattern: TypeAlias = tuple[re.Pattern[str], ErrorCode, str]

#: The job report is parsed in memory; a report beyond this is a broken transform, and
#: reading it would cost the pilot more memory than the job is worth.
MAX_JOB_REPORT_BYTES = 16 * 1024 * 1024

#: ``metaData`` is stored by the server in one database column; a bigger summary is
#: dropped rather than cut, because cut JSON is useless to the server.
MAX_META_DATA_BYTES = 100 * 1024

#: Longest matched line kept in a pattern's detail, so that the formatted diagnostic
#: (standard message + detail) still shows the interesting part within 256 characters.
_MAX_DETAIL = 200

_M = re.MULTILINE
_MI = re.MULTILINE | re.IGNORECASE

#: Known failure messages, most specific cause first: the first pattern that matches
#: anywhere in the text wins.  Container-runtime failures come first because they stop
#: the payload before it starts; exhausted resources come before the errors they cause
#: (a full disk or memory makes later commands fail or crash).  Experiment plug-ins
#: extend it by passing ``patterns=MY_PATTERNS + STDERR_PATTERNS``.
STDERR_PATTERNS: tuple[StderrPattern, ...] = (
    # Container runtime (reference pilot's resolve_transform_error and
    # set_error_code_from_stderr tables).
    (
        re.compile(r"Not mounting requested bind point"),
        ErrorCode.SINGULARITYBINDPOINTFAILURE,
        "container bind point not mounted",
    ),
    (
        re.compile(r"No more available loop devices"),
        ErrorCode.SINGULARITYNOLOOPDEVICES,
        "no loop devices left",
    ),
    (
        re.compile(r"Failed to mount image|error: while mounting"),
        ErrorCode.SINGULARITYIMAGEMOUNTFAILURE,
        "container image mount failed",
    ),
    (
        re.compile(r"Failed invoking the NEWUSER namespace runtime"),
        ErrorCode.SINGULARITYNEWUSERNAMESPACE,
        "NEWUSER namespace runtime failed",
    ),
    (
        re.compile(r"Failed to create user namespace"),
        ErrorCode.SINGULARITYFAILEDUSERNAMESPACE,
        "user namespace creation failed",
    ),
    (
        re.compile(r"Singularity is not installed"),
        ErrorCode.SINGULARITYNOTINSTALLED,
        "singularity not installed",
    ),
    (
        re.compile(r"Apptainer is not installed"),
        ErrorCode.APPTAINERNOTINSTALLED,
        "apptainer not installed",
    ),
    # The reference matches these two anywhere; both are ordinary errno texts that any
    # program prints, so we only blame the container when the line names it.
    (
        re.compile(r"\b(?:singularity|apptainer|container)\b[^\n]*operation not permitted", _MI),
        ErrorCode.SINGULARITYGENERALFAILURE,
        "container operation not permitted",
    ),
    (
        re.compile(r"\b(?:singularity|apptainer|container)\b[^\n]*resource temporarily unavailable", _MI),
        ErrorCode.SINGULARITYRESOURCEUNAVAILABLE,
        "container resource temporarily unavailable",
    ),
    # Exhausted local resources.
    (
        re.compile(r"No space left on device"),
        ErrorCode.NOLOCALSPACE,
        "no space left on device",
    ),
    (
        re.compile(r"\bout of memory\b|std::bad_alloc|St9bad_alloc|^MemoryError\b", _MI),
        ErrorCode.PAYLOADOUTOFMEMORY,
        "out of memory",
    ),
    # Software installation and setup.
    (
        re.compile(r"^(?:/bin/)?(?:ba)?sh: [^\n]*(?i:setup)\.sh[^\n]*No such file", _M),
        ErrorCode.MISSINGINSTALLATION,
        "setup script missing",
    ),
    (
        re.compile(r"AtlasSetup\(FATAL\): Fatal exception"),
        ErrorCode.SETUPFATAL,
        "setup raised a fatal exception",
    ),
    (
        re.compile(r"ERROR: unable to fetch source tarball from web"),
        ErrorCode.MISSINGUSERCODE,
        "user source tarball not fetched",
    ),
    (
        re.compile(r"SL5 is unsupported"),
        ErrorCode.UNSUPPORTEDSL5OS,
        "SL5 is unsupported",
    ),
    (
        re.compile(r"unrecognized arguments"),
        ErrorCode.UNRECOGNIZEDTRFARGUMENTS,
        "unrecognized arguments",
    ),
    (
        re.compile(r"command not found"),
        ErrorCode.TRANSFORMNOTFOUND,
        "command not found",
    ),
    (
        re.compile(r"prepare 5 database is locked|Error SQLiteStatement"),
        ErrorCode.NFSSQLITE,
        "SQLite database locked",
    ),
    # Crashes, after the resource patterns whose consequence they often are.
    (
        re.compile(r"Segmentation fault|segmentation violation|\bSIGSEGV\b", _MI),
        error_for_signal(_signal.SIGSEGV),
        "segmentation fault",
    ),
    (
        re.compile(r"resource temporarily unavailable", _MI),
        ErrorCode.RESOURCEUNAVAILABLE,
        "resource temporarily unavailable",
    ),
)

#: Container-runtime failures.  Only these override a zero exit status: a container
#: wrapper can exit 0 although the payload never started, while the other patterns in
#: the output of a successful payload are noise (a probe for an optional command, say).
CONTAINER_CODES: frozenset[ErrorCode] = frozenset(
    {
        ErrorCode.SINGULARITYGENERALFAILURE,
        ErrorCode.SINGULARITYNOLOOPDEVICES,
        ErrorCode.SINGULARITYBINDPOINTFAILURE,
        ErrorCode.SINGULARITYIMAGEMOUNTFAILURE,
        ErrorCode.SINGULARITYNEWUSERNAMESPACE,
        ErrorCode.SINGULARITYFAILEDUSERNAMESPACE,
        ErrorCode.SINGULARITYRESOURCEUNAVAILABLE,
        ErrorCode.SINGULARITYNOTINSTALLED,
        ErrorCode.APPTAINERNOTINSTALLED,
    }
)

#: Patterns in the job report's ``exitMsg``: the transform's own diagnosis outranks
#: what we guess from its output.
REPORT_PATTERNS: tuple[StderrPattern, ...] = (
    (re.compile(r"got a SIGSEGV signal"), ErrorCode.PAYLOADSIGSEGV, "payload got SIGSEGV"),
    (re.compile(r"bad_alloc"), ErrorCode.BADALLOC, "bad_alloc"),
)

#: Lines worth quoting when nothing more specific explains a failure (the reference
#: pilot's diagnostic fallbacks, in its order).
_ERROR_LINE = re.compile(r"^[^\n]*\b(?:ERROR|Error|error):[^\n]*", _M)
_WARNING_LINE = re.compile(r"^[^\n]*\bWARNING:[^\n]*", _M)
_CRITICAL_LINE = re.compile(r"^[^\n]*\bCRITICAL\b[^\n]*", _M)


@record(frozen=True)
class PayloadAnalysis:
    """The final-update fields learnt from a finished payload.

    ``pilot_error`` is a pilot error code with its detail (for
    :func:`pilot.errors.format_diag`) when the analysis recognised *why* the payload
    failed; ``None`` leaves the caller's own judgement of the exit status in charge.
    ``job_metrics`` holds extra ``key=value`` items for the update's ``jobMetrics``.
    """

    exe_error_code: int | None = None
    exe_error_diag: str | None = None
    n_events: int | None = None
    pilot_error: tuple[ErrorCode, str] | None = None
    meta_data: str | None = None
    job_metrics: dict[str, str] = field(default_factory=dict)


def read_tail(path: Path, limit: int = 64 * 1024) -> str:
    """The last ``limit`` bytes of ``path`` as text; ``""`` if it cannot be read.

    Payload logs reach gigabytes, and the errors that explain a failure are at the end,
    so only the tail is ever read.  Bytes that are not UTF-8 (or a character cut by the
    seek) become U+FFFD instead of failing the analysis.
    """
    if limit <= 0:
        return ""
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(max(0, size - limit))
            data = handle.read(limit)
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")


def classify_stderr(
    text: str, *, patterns: Sequence[StderrPattern] = STDERR_PATTERNS
) -> tuple[ErrorCode, str] | None:
    """The pilot error the first matching pattern names, with the line it matched.

    The detail is ``"<short text>: <matched line>"`` so that the reported diagnostic
    shows the payload's own words, not only our label for them.
    """
    for regex, code, short in patterns:
        match = regex.search(text)
        if match is not None:
            return code, _detail(short, _line_at(text, match.start()))
    return None


def analyse_payload(
    exit_code: int | None,
    signal: int | None,
    workdir: Path,
    *,
    stdout_name: str = "payload.stdout",
    stderr_name: str = "payload.stderr",
    job_report_name: str = "jobReport.json",
    patterns: Sequence[StderrPattern] = STDERR_PATTERNS,
) -> PayloadAnalysis:
    """Turn how the payload ended into the final update's fields.

    ``exit_code`` is the payload's exit status (``None`` when a signal ended it), and
    ``signal`` the signal number that killed it, if any.  The job report's ``exitCode``
    and ``exitMsg`` are the transform's own verdict and win over what we infer; the
    output patterns explain failures the transform could not report itself (it never
    started, or the machine ran out of memory or disk).

    Synchronous and blocking (run it in a thread); never raises on what it reads.
    """
    stderr = read_tail(workdir / stderr_name)
    stdout = read_tail(workdir / stdout_name)
    report, note = _load_report(workdir / job_report_name)
    fields = _ReportFields.of(report) if report is not None else _ReportFields()

    failed = (
        signal is not None
        or (exit_code is not None and exit_code != 0)
        or (fields.exit_code is not None and fields.exit_code != 0)
    )
    pilot_error = _pilot_error(exit_code, signal, failed, fields, stderr, stdout, patterns)

    diag = fields.exit_msg or fields.exit_acronym
    if diag is None and pilot_error is not None:
        diag = pilot_error[1]
    if diag is None and failed:
        diag = _error_line(stderr, stdout)
    if diag is None:
        diag = note

    n_events = fields.n_events()
    metrics: dict[str, str] = {}
    if n_events is not None:
        metrics["nEvents"] = str(n_events)
    if fields.cpu_time is not None:
        metrics["trfCpuTime"] = str(round(fields.cpu_time))
    if fields.wall_time is not None:
        metrics["trfWallTime"] = str(round(fields.wall_time))

    return PayloadAnalysis(
        exe_error_code=fields.exit_code if fields.exit_code is not None else exit_code,
        exe_error_diag=_cut(diag, MAX_DIAG_LENGTH) if diag else None,
        n_events=n_events,
        pilot_error=pilot_error,
        meta_data=fields.meta_data(),
        job_metrics=metrics,
    )


def _pilot_error(
    exit_code: int | None,
    signal: int | None,
    failed: bool,
    fields: _ReportFields,
    stderr: str,
    stdout: str,
    patterns: Sequence[StderrPattern],
) -> tuple[ErrorCode, str] | None:
    """The most telling pilot error, or ``None`` if nothing names a cause.

    A matched pattern beats the bare signal: the kernel's OOM killer sends SIGKILL, and
    "out of memory" says more than "killed by signal 9".
    """
    if not failed:
        patterns = [p for p in patterns if p[1] in CONTAINER_CODES]
    elif fields.exit_msg is not None:
        found = classify_stderr(fields.exit_msg, patterns=REPORT_PATTERNS)
        if found is not None:
            return found
    found = classify_stderr(stderr, patterns=patterns) or classify_stderr(stdout, patterns=patterns)
    if found is not None or not failed:
        return found
    if signal is not None:
        return error_for_signal(signal), f"payload killed by {_signal_text(signal)}"
    if exit_code == 0 and fields.exit_code:
        said = f"{fields.exit_code} {fields.exit_msg or ''}"
        return ErrorCode.UNKNOWNPAYLOADFAILURE, _detail(
            "payload exited 0 but its job report says exitCode", said
        )
    return None


class _ReportFields:
    """The values the pilot reads from a job report, each checked for its type.

    Transforms change their reports between releases, so every field is optional and a
    wrongly typed one counts as absent.
    """

    def __init__(self, report: dict[str, object] | None = None) -> None:
        self.exit_code: int | None = None
        self.exit_msg: str | None = None
        self.exit_acronym: str | None = None
        self.files: dict[str, object] | None = None
        self.resource: dict[str, object] | None = None
        self.output_events: list[int] = []
        self.executor_events: list[int] = []
        self.top_events: int | None = None
        self.cpu_time: float | None = None
        self.wall_time: float | None = None

    @classmethod
    def of(cls, report: dict[str, object]) -> _ReportFields:
        fields = cls()
        fields.exit_code = _int(report.get("exitCode"))
        fields.exit_msg = _text(report.get("exitMsg"))
        fields.exit_acronym = _text(report.get("exitAcronym"))
        fields.top_events = _count(report.get("nEvents"))

        files = report.get("files")
        if isinstance(files, dict):
            fields.files = files
            for output in _dicts(files.get("output")):
                counts = [_count(sub.get("nentries")) for sub in _dicts(output.get("subFiles"))]
                known = [c for c in counts if c is not None]
                if known:
                    fields.output_events.append(sum(known))

        resource = report.get("resource")
        if isinstance(resource, dict):
            fields.resource = resource
            executors = resource.get("executor")
            if isinstance(executors, dict):
                cpu: list[float] = []
                wall: list[float] = []
                for step in executors.values():
                    if not isinstance(step, dict):
                        continue
                    events = _count(step.get("nevents"))
                    if events is not None:
                        fields.executor_events.append(events)
                    _append_seconds(cpu, step.get("cpuTime"))
                    _append_seconds(wall, step.get("wallTime"))
                fields.cpu_time = sum(cpu) if cpu else None
                fields.wall_time = sum(wall) if wall else None
        return fields

    def n_events(self) -> int | None:
        """Events processed: from the outputs, else the executors, else ``nEvents``.

        A transform writes the same events into several output types (AOD and DAOD, say)
        and runs them through several steps, so counts are summed over the files of one
        type but the largest type or step is taken, never the total.
        """
        if self.output_events:
            return max(self.output_events)
        if self.executor_events:
            return max(self.executor_events)
        return self.top_events

    def meta_data(self) -> str | None:
        """Compact JSON of the report's ``files`` and ``resource`` sections, if small enough."""
        summary = {
            key: value
            for key, value in (("files", self.files), ("resource", self.resource))
            if value is not None
        }
        if not summary:
            return None
        try:
            text = json.dumps(summary, separators=(",", ":"), allow_nan=False)
        except (ValueError, TypeError, RecursionError):
            return None
        return text if len(text) <= MAX_META_DATA_BYTES else None


def _load_report(path: Path) -> tuple[dict[str, object] | None, str | None]:
    """The parsed job report, or ``None`` and why (no reason if there is no report).

    Most payloads write no report, so a missing file is normal.  ``NaN`` and
    ``Infinity`` are refused because the report is forwarded as JSON, where they are
    invalid.
    """
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_JOB_REPORT_BYTES + 1)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"{path.name} unreadable: {exc.strerror or exc}"
    if len(data) > MAX_JOB_REPORT_BYTES:
        return None, f"{path.name} larger than {MAX_JOB_REPORT_BYTES} bytes; ignored"
    try:
        report = json.loads(data.decode("utf-8-sig"), parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        return None, f"{path.name} is not UTF-8; ignored"
    except (ValueError, RecursionError):
        return None, f"{path.name} is not valid JSON; ignored"
    if not isinstance(report, dict):
        return None, f"{path.name} is not a JSON object; ignored"
    return report, None


def _refuse_constant(name: str) -> object:
    raise ValueError(f"non-standard JSON constant {name}")


def _int(value: object) -> int | None:
    """``value`` if it is a JSON integer (``true`` is a Python int, but not one here)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _count(value: object) -> int | None:
    number = _int(value)
    return number if number is not None and number >= 0 else None


def _append_seconds(into: list[float], value: object) -> None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        into.append(float(value))


def _text(value: object) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _dicts(value: object) -> list[dict[str, object]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _line_at(text: str, index: int) -> str:
    start = text.rfind("\n", 0, index) + 1
    end = text.find("\n", index)
    return text[start : end if end >= 0 else len(text)]


def _detail(short: str, line: str) -> str:
    line = " ".join(line.split())
    if not line or line == short:
        return short
    return _cut(f"{short}: {line}", _MAX_DETAIL)


def _cut(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error_line(stderr: str, stdout: str) -> str | None:
    """The payload's own last complaint, to quote when nothing more specific is known."""
    for regex, text in ((_ERROR_LINE, stderr), (_WARNING_LINE, stderr), (_CRITICAL_LINE, stdout)):
        lines = regex.findall(text)
        if lines:
            return _cut(lines[-1], MAX_DIAG_LENGTH)
    for line in reversed(stderr.splitlines()):
        if line.strip():
            return _cut(line, MAX_DIAG_LENGTH)
    return None


def _signal_text(signum: int | None) -> str | None:
    if signum is None:
        return None
    try:
        return f"signal {signum} ({_signal.Signals(signum).name})"
    except ValueError:
        return f"signal {signum}"
