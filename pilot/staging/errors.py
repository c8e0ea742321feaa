"""What a copytool's failure means, as a PanDA error code.

Copytools report failures as text (stderr of ``xrdcp``, ``gfal-copy``, ``rucio``...).
The patterns below, checked in order, are those PanDA's tools are known to print;
anything else is STAGEINFAILED / STAGEOUTFAILED with the text as diagnostic.
"""

from __future__ import annotations

from pilot.errorcodes import ErrorCode
from pilot.staging.transfer import TransferError

#: (substring, stage-in code, stage-out code, the file is simply missing)
_PATTERNS: tuple[tuple[str, ErrorCode, ErrorCode, bool], ...] = (
    ("timeout", ErrorCode.STAGEINTIMEOUT, ErrorCode.STAGEOUTTIMEOUT, False),
    ("timed out", ErrorCode.STAGEINTIMEOUT, ErrorCode.STAGEOUTTIMEOUT, False),
    ("failed xrdadler32", ErrorCode.GETADMISMATCH, ErrorCode.PUTADMISMATCH, False),
    ("checksum error", ErrorCode.GETADMISMATCH, ErrorCode.PUTADMISMATCH, False),
    ("checksum mismatch", ErrorCode.GETADMISMATCH, ErrorCode.PUTADMISMATCH, False),
    ("does not match the checksum", ErrorCode.GETADMISMATCH, ErrorCode.PUTADMISMATCH, False),
    ("globus_xio:", ErrorCode.GETGLOBUSSYSERR, ErrorCode.PUTGLOBUSSYSERR, False),
    ("file exists", ErrorCode.FILEEXISTS, ErrorCode.FILEEXISTS, False),
    ("srm_file_busy", ErrorCode.FILEEXISTS, ErrorCode.FILEEXISTS, False),
    ("file already exists", ErrorCode.FILEEXISTS, ErrorCode.FILEEXISTS, False),
    ("no space left on device", ErrorCode.NOLOCALSPACE, ErrorCode.NOREMOTESPACE, False),
    ("disk quota exceeded", ErrorCode.NOLOCALSPACE, ErrorCode.NOREMOTESPACE, False),
    ("no such file or directory", ErrorCode.MISSINGINPUTFILE, ErrorCode.NOSUCHFILE, True),
    ("command not found", ErrorCode.STAGEINFAILED, ErrorCode.STAGEOUTFAILED, False),
    ("data identifier not found", ErrorCode.MISSINGINPUTFILE, ErrorCode.STAGEOUTFAILED, True),
    ("nofilesdownloaded", ErrorCode.MISSINGINPUTFILE, ErrorCode.STAGEOUTFAILED, True),
    ("no files downloaded", ErrorCode.MISSINGINPUTFILE, ErrorCode.STAGEOUTFAILED, True),
    ("404 not found", ErrorCode.MISSINGINPUTFILE, ErrorCode.STAGEOUTFAILED, True),
    ("nosuchkey", ErrorCode.MISSINGINPUTFILE, ErrorCode.STAGEOUTFAILED, True),
    ("query chksum is not supported", ErrorCode.CHKSUMNOTSUP, ErrorCode.CHKSUMNOTSUP, False),
    ("unable to checksum", ErrorCode.CHKSUMNOTSUP, ErrorCode.CHKSUMNOTSUP, False),
    ("could not establish context", ErrorCode.NOPROXY, ErrorCode.NOPROXY, False),
    (
        "cannot authenticate",
        ErrorCode.STAGEINAUTHENTICATIONFAILURE,
        ErrorCode.STAGEOUTAUTHENTICATIONFAILURE,
        False,
    ),
    (
        "permission denied",
        ErrorCode.STAGEINAUTHENTICATIONFAILURE,
        ErrorCode.STAGEOUTAUTHENTICATIONFAILURE,
        False,
    ),
    ("unable to locate credentials", ErrorCode.MISSINGCREDENTIALS, ErrorCode.MISSINGCREDENTIALS, False),
    (
        "service is not available at the moment",
        ErrorCode.SERVICENOTAVAILABLE,
        ErrorCode.SERVICENOTAVAILABLE,
        False,
    ),
    ("service_unavailable", ErrorCode.RUCIOSERVICEUNAVAILABLE, ErrorCode.RUCIOSERVICEUNAVAILABLE, False),
    ("network is unreachable", ErrorCode.UNREACHABLENETWORK, ErrorCode.UNREACHABLENETWORK, False),
    ("server responded with an error", ErrorCode.XRDCPERROR, ErrorCode.STAGEOUTFAILED, False),
)


def classify(text: str, *, stage_in: bool) -> TransferError:
    """The TransferError a copytool's failure text stands for."""
    lowered = text.lower()
    for needle, code_in, code_out, missing in _PATTERNS:
        if needle in lowered:
            return TransferError(code_in if stage_in else code_out, _last_lines(text), missing=missing)
    return TransferError(ErrorCode.STAGEINFAILED if stage_in else ErrorCode.STAGEOUTFAILED, _last_lines(text))


def _last_lines(text: str, limit: int = 200) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    tail = " | ".join(lines[-3:])
    return tail[-limit:] if len(tail) > limit else tail
