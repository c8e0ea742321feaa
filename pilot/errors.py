"""Pilot failures, their PanDA error codes, and the pilot's shell exit codes.

Every failure that reaches the server carries one of PanDA's numeric pilot error
codes (``pilot.errorcodes``, generated from ``pilot/data/error-codes.tsv``), because
PanDA's monitoring and retry logic key on the numbers.  The pilot process itself
exits with a small shell code taken from the reference pilot's translation table,
so that wrapper scripts and batch systems can tell *why* a pilot ended.
"""

from __future__ import annotations

import errno
import signal
from collections.abc import Iterator
from enum import IntEnum

from pilot.errorcodes import STANDARD_MESSAGES, ErrorCode
from pilot.util.records import record

#: PanDA truncates ``pilotErrorDiag``; we never send more than this.
MAX_DIAG_LENGTH = 256

#: Stage-out style failures: the job is reported ``holding`` (when the pilot stored
#: nothing; see ``final_server_state``) so that the server can recover it later
#: instead of failing it outright.
RECOVERABLE_CODES: frozenset[ErrorCode] = frozenset(
    {
        ErrorCode.STAGEOUTFAILED,
        ErrorCode.PUTMD5MISMATCH,
        ErrorCode.STAGEOUTTIMEOUT,
        ErrorCode.PUTGLOBUSSYSERR,
    }
)


def format_diag(code: ErrorCode, detail: str = "") -> str:
    """``"<standard message>: <detail>"``, cut to PanDA's 256-character limit."""
    standard = STANDARD_MESSAGES[code]
    text = f"{standard}: {detail}" if detail else standard
    text = " ".join(text.split())
    if len(text) > MAX_DIAG_LENGTH:
        text = text[: MAX_DIAG_LENGTH - 3] + "..."
    return text


class PilotError(Exception):
    """A failure that fails (or holds) a job with a PanDA pilot error code.

    Raised anywhere in a job's pipeline; the pipeline catches it, records it on the
    job and reports the job.  ``detail`` is the specific reason; the reported
    diagnostic combines it with the code's standard message.
    """

    def __init__(self, code: ErrorCode, detail: str = "") -> None:
        super().__init__(f"{code.name} ({int(code)}): {detail}" if detail else code.name)
        self.code = code
        self.detail = detail

    @property
    def diag(self) -> str:
        return format_diag(self.code, self.detail)


@record(frozen=True)
class JobError:
    """One recorded error of a job: code plus its formatted diagnostic."""

    code: ErrorCode
    diag: str

    @property
    def recoverable(self) -> bool:
        return self.code in RECOVERABLE_CODES


class JobErrors:
    """The errors of one job.  The first one recorded is the one PanDA sees.

    ``priority=True`` puts an error in front (a kill by the server outranks the
    payload failure it caused).  Duplicates of an already-recorded code are dropped.
    """

    def __init__(self) -> None:
        self._errors: list[JobError] = []

    def record(self, code: ErrorCode, detail: str = "", *, priority: bool = False) -> None:
        if any(e.code == code for e in self._errors):
            return
        error = JobError(code, format_diag(code, detail))
        if priority:
            self._errors.insert(0, error)
        else:
            self._errors.append(error)

    def record_exception(self, exc: PilotError, *, priority: bool = False) -> None:
        self.record(exc.code, exc.detail, priority=priority)

    @property
    def first(self) -> JobError | None:
        return self._errors[0] if self._errors else None

    def __bool__(self) -> bool:
        return bool(self._errors)

    def __iter__(self) -> Iterator[JobError]:
        return iter(self._errors)


#: Signal → PanDA error code, as the reference pilot reports a job it was
#: interrupted in.
#: errno values that mean "the local disk is full" (the job's work directory or the pilot's).
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def local_file_error(
    exc: OSError, what: str, default: ErrorCode = ErrorCode.FILEHANDLINGFAILURE
) -> PilotError:
    """A PilotError for a failed local file operation: NOLOCALSPACE when the disk is full."""
    code = ErrorCode.NOLOCALSPACE if exc.errno in DISK_FULL_ERRNOS else default
    return PilotError(code, f"{what}: {exc.strerror or exc}")


SIGNAL_ERRORS: dict[int, ErrorCode] = {
    signal.SIGTERM: ErrorCode.SIGTERM,
    signal.SIGQUIT: ErrorCode.SIGQUIT,
    signal.SIGSEGV: ErrorCode.SIGSEGV,
    signal.SIGXCPU: ErrorCode.SIGXCPU,
    signal.SIGUSR1: ErrorCode.SIGUSR1,
    signal.SIGINT: ErrorCode.SIGINT,
    signal.SIGBUS: ErrorCode.SIGBUS,
}


def error_for_signal(signum: int) -> ErrorCode:
    return SIGNAL_ERRORS.get(signum, ErrorCode.KILLSIGNAL)


class ExitCode(IntEnum):
    """The pilot process's exit status (documented in the README).

    The numbers for pilot-level errors follow the reference pilot's translation
    table so that existing wrapper scripts keep working.
    """

    OK = 0
    FAILURE = 1
    USAGE = 2
    SITE_OFFLINE = 64
    GENERALERROR = 65
    MKDIR = 66
    NOSUCHFILE = 67
    NOPROXY = 68
    NOLOCALSPACE = 69
    UNKNOWNEXCEPTION = 70
    QUEUEDATA = 71
    QUEUEDATANOTOK = 72
    NOSOFTWAREDIR = 73
    JSONRETRIEVALTIMEOUT = 74
    BLACKHOLE = 75
    MIDDLEWAREIMPORTFAILURE = 76
    MISSINGINPUTFILE = 77
    PANDAQUEUENOTACTIVE = 78
    COMMUNICATIONFAILURE = 79
    PROXYTOOSHORT = 80
    REACHEDMAXTIME = 81
    NOJOBSINPANDA = 82
    PANDAQUEUENOTONLINE = 83
    SIGINT = 130
    SIGQUIT = 131
    SIGBUS = 135
    KILLSIGNAL = 137
    SIGUSR1 = 138
    SIGSEGV = 139
    SIGTERM = 143
    SIGXCPU = 152


_EXIT_FOR_ERROR: dict[ErrorCode, ExitCode] = {
    ErrorCode.CVMFSISNOTALIVE: ExitCode.SITE_OFFLINE,
    ErrorCode.GENERALERROR: ExitCode.GENERALERROR,
    ErrorCode.MKDIR: ExitCode.MKDIR,
    ErrorCode.NOSUCHFILE: ExitCode.NOSUCHFILE,
    ErrorCode.NOVOMSPROXY: ExitCode.NOPROXY,
    ErrorCode.NOPROXY: ExitCode.NOPROXY,
    ErrorCode.CERTIFICATEHASEXPIRED: ExitCode.NOPROXY,
    ErrorCode.NOLOCALSPACE: ExitCode.NOLOCALSPACE,
    ErrorCode.UNKNOWNEXCEPTION: ExitCode.UNKNOWNEXCEPTION,
    ErrorCode.QUEUEDATA: ExitCode.QUEUEDATA,
    ErrorCode.QUEUEDATANOTOK: ExitCode.QUEUEDATANOTOK,
    ErrorCode.NOSOFTWAREDIR: ExitCode.NOSOFTWAREDIR,
    ErrorCode.JSONRETRIEVALTIMEOUT: ExitCode.JSONRETRIEVALTIMEOUT,
    ErrorCode.BLACKHOLE: ExitCode.BLACKHOLE,
    ErrorCode.MIDDLEWAREIMPORTFAILURE: ExitCode.MIDDLEWAREIMPORTFAILURE,
    ErrorCode.MISSINGINPUTFILE: ExitCode.MISSINGINPUTFILE,
    ErrorCode.PANDAQUEUENOTACTIVE: ExitCode.PANDAQUEUENOTACTIVE,
    ErrorCode.COMMUNICATIONFAILURE: ExitCode.COMMUNICATIONFAILURE,
    ErrorCode.PROXYTOOSHORT: ExitCode.PROXYTOOSHORT,
    ErrorCode.REACHEDMAXTIME: ExitCode.REACHEDMAXTIME,
    ErrorCode.NOJOBSINPANDA: ExitCode.NOJOBSINPANDA,
    ErrorCode.PANDAQUEUENOTONLINE: ExitCode.PANDAQUEUENOTONLINE,
    ErrorCode.BADQUEUECONFIGURATION: ExitCode.QUEUEDATANOTOK,
    ErrorCode.KILLSIGNAL: ExitCode.KILLSIGNAL,
    ErrorCode.SIGTERM: ExitCode.SIGTERM,
    ErrorCode.SIGQUIT: ExitCode.SIGQUIT,
    ErrorCode.SIGSEGV: ExitCode.SIGSEGV,
    ErrorCode.SIGXCPU: ExitCode.SIGXCPU,
    ErrorCode.SIGUSR1: ExitCode.SIGUSR1,
    ErrorCode.SIGINT: ExitCode.SIGINT,
    ErrorCode.SIGBUS: ExitCode.SIGBUS,
}


def exit_code_for(error: ErrorCode | None) -> ExitCode:
    """Translate a pilot-level error (``None`` = none) into the process exit code.

    Errors without their own entry become ``FAILURE`` (1), as in the reference.
    """
    if error is None:
        return ExitCode.OK
    return _EXIT_FOR_ERROR.get(error, ExitCode.FAILURE)
