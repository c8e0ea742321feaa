"""What a file name (LFN) and a Rucio scope may contain, checked when the job arrives.

An LFN becomes three things: a file name in the work directory, an argument of
copytools and tar, and the last component of a storage URL built by plain
concatenation (``<protocol endpoint><path>/<scope dirs>/<md5 dirs>/<lfn>``, Rucio's
deterministic layout).  In a URL, ``?`` starts a query, ``#`` a fragment and ``%`` an
escape, and a space is not allowed at all: ``data#1.root`` is written by an HTTP or
XRootD client as ``data`` (or under a decoded name) while the pilot reports the
concatenated URL, so the report would name a file that is not on storage.  Quoting
cannot fix that for every tool (XRootD paths are not percent-decoded, WebDAV paths
are), and Rucio itself only accepts names made of ``[A-Za-z0-9._-]``, so such names
are refused when the job arrives: ``BADOUTPUTFILENAME`` for outputs and the log,
``STAGEINFAILED`` for inputs (pilot3 has no dedicated code for a bad input name; its
input failures are stage-in failures).
"""

from __future__ import annotations

import re

from pilot.errorcodes import ErrorCode
from pilot.model.fields import JobDefinitionError, shown

MAX_LFN_LENGTH = 255

#: Characters that change what a URL means, or cannot appear in one.
URL_SPECIAL = frozenset("?#% ")

#: Rucio's scope alphabet (``[A-Za-z0-9._-]``), starting with a letter or digit so that a
#: scope is never ``.``/``..``, hidden, or read as an option.  Rucio stores at most 25
#: characters; 64 leaves room for non-Rucio storage layouts without harming a path.
_SCOPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_lfn(lfn: str, field_name: str, code: ErrorCode) -> str:
    """Reject a file name that could escape the work directory, confuse a tool or a URL.

    No path separators, no ``.``/``..``, no NUL, control characters or lone
    surrogates, no leading ``-`` (it would read as an option), none of ``?#%`` or
    space (see the module's docstring), at most 255 characters.
    """
    if len(lfn) > MAX_LFN_LENGTH:
        raise JobDefinitionError(
            ErrorCode.LFNTOOLONG, field_name, f"LFN longer than {MAX_LFN_LENGTH} characters"
        )
    if (
        not lfn
        or lfn in (".", "..")
        or "/" in lfn
        or "\\" in lfn
        or lfn.startswith("-")
        or any(ord(c) < 32 or ord(c) == 127 for c in lfn)
    ):
        raise JobDefinitionError(code, field_name, f"unsafe file name {shown(lfn)}")
    special = sorted(URL_SPECIAL.intersection(lfn))
    if special:
        raise JobDefinitionError(
            code,
            field_name,
            f"file name {shown(lfn)} has {''.join(special)!r}, which a storage URL would not keep",
        )
    try:
        lfn.encode("utf-8")
    except UnicodeEncodeError:
        raise JobDefinitionError(code, field_name, "file name is not valid UTF-8 (lone surrogate)") from None
    return lfn


def valid_scope(scope: str) -> bool:
    """Whether ``scope`` is a Rucio scope that is safe as a path component."""
    return bool(_SCOPE.fullmatch(scope)) and ".." not in scope


def check_scope(scope: str, field_name: str) -> str:
    """``scope`` if it is a valid Rucio scope, else a definition error (malformed value)."""
    if not valid_scope(scope):
        raise JobDefinitionError(
            ErrorCode.CONVERSIONFAILURE,
            field_name,
            f"not a Rucio scope: {shown(scope)} (letters, digits, '.', '_', '-'; no '..')",
        )
    return scope
