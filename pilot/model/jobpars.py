"""The job parameters (``jobPars``): their size limit, and ``--containerImage`` taken out.

Size.  The payload runs as ``/bin/bash -c "<transformation> <jobPars>"``: the whole
command is ONE argument of ``execve``, and Linux refuses any single argument longer
than ``MAX_ARG_STRLEN`` = 32 pages = 131072 bytes, terminating NUL included, with
E2BIG.  A longer command can never run; without a limit the pilot would find that
out only when the payload fails to start, after stage-in, and report a payload
failure.  So the command (the transformation as the generic experiment quotes it, a
space, the parameters, in UTF-8) must fit in 131071 bytes less 8192 bytes kept for
what an experiment plug-in puts before it (a setup line, a container wrapper's
``cd``): at most ``MAX_COMMAND_BYTES`` = 122879 bytes.  The transformation alone is a
path or a URL: at most ``PATH_MAX`` = 4096 bytes.

``--containerImage``.  PanDA puts the payload's container image into the parameters
(``--containerImage docker://...`` or ``--containerImage=...``); the option is for the
pilot, not for the transformation, so it is taken out of the command
(``payload_args``) and its value becomes the image.  Finding it must not cost more
than reading the text once: ``shlex`` builds tokens by string concatenation and takes
seconds on a single 1 MB word, on the reactor thread.  Here words are found the way
``shlex.split`` finds them (POSIX quoting, whitespace-separated) by regular expressions
with possessive quantifiers (one pass, no backtracking), words that cannot be the
option are skipped inside one match, and only the few that might be are unquoted.
At the size limit: about 2 ms for 120 kB of pathological quoting, 30 ms at worst (one
120 kB word that might be the option), where ``shlex`` takes 0.1 s and grows
quadratically (0.8 MB: 2-7 s).
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Iterator

from pilot.errorcodes import ErrorCode
from pilot.model.fields import JobDefinitionError, shown, utf8_size
from pilot.util.records import record

MAX_ARG_STRLEN = 131072
#: Room left in the ``bash -c`` argument for an experiment's prefix to the command.
COMMAND_HEADROOM = 8192
MAX_COMMAND_BYTES = MAX_ARG_STRLEN - 1 - COMMAND_HEADROOM
MAX_TRANSFORMATION_BYTES = 4096

OPTION = "--containerImage"

#: One shell word as ``shlex.split`` sees it (whitespace ``" \t\r\n"`` separates words):
#: unquoted runs, ``'...'``, ``"..."`` with backslash escapes, ``\x``; an unclosed quote or a
#: final backslash runs to the end.  Possessive quantifiers: no backtracking, one pass.
_WORD = re.compile(
    r"""(?:[^ \t\r\n'"\\]++|'[^']*+(?:'|\Z)|"(?:[^"\\]++|\\.)*+\\?(?:"|\Z)|\\.|\\\Z)++""",
    re.DOTALL,
)
#: Blanks and words that cannot unquote to the option (the option's letters, quote characters
#: allowed between them, do not start them): skipped in one match, without a Python loop.
_SKIP = re.compile(
    r"(?:[ \t\r\n]++|(?!"
    + "".join(f"['\"\\\\]*+{re.escape(c)}" for c in OPTION)
    + ")"
    + _WORD.pattern
    + ")*+",
    re.DOTALL,
)
_TOP_SPECIAL = re.compile(r"['\"\\]")
_DOUBLE_SPECIAL = re.compile(r'["\\]')
_QUOTING = str.maketrans("", "", "'\"\\")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


@record(frozen=True)
class Word:
    """One shell word: where it is in the text (``[start, end)``) and its text there."""

    start: int
    end: int
    raw: str

    @property
    def value(self) -> str:
        """The word without its quoting (what the program would receive)."""
        return unquote(self.raw)


def shell_words(text: str) -> Iterator[Word]:
    """The words of ``text`` as ``shlex.split`` sees them, in time linear in ``len(text)``.

    Outside quotes a backslash escapes the next character; ``'...'`` is literal;
    inside ``"..."`` a backslash escapes only ``"`` and ``\\``.  Where ``shlex`` raises
    (an unclosed quote, a final backslash) the word runs to the end of the text: the
    pilot only looks for its option, and bash reports the error when the payload runs.
    """
    for match in _WORD.finditer(text):
        yield Word(match.start(), match.end(), match.group())


def unquote(raw: str) -> str:
    """The value of one shell word; every step of the loops consumes at least one character."""
    length = len(raw)
    pieces: list[str] = []
    position = 0
    while position < length:
        special = _TOP_SPECIAL.search(raw, position)
        stop = special.start() if special is not None else length
        pieces.append(raw[position:stop])
        position = stop
        if position == length:
            break
        char = raw[position]
        if char == "\\":
            pieces.append(raw[position + 1 : position + 2])
            position += 2
        elif char == "'":
            close = raw.find("'", position + 1)
            close = length if close < 0 else close
            pieces.append(raw[position + 1 : close])
            position = close + 1
        else:
            position = _double_quoted(raw, position + 1, pieces)
    return "".join(pieces)


def _double_quoted(text: str, position: int, pieces: list[str]) -> int:
    """Append the value of a ``"..."`` whose text starts at ``position``; where it ends."""
    length = len(text)
    while position < length:
        special = _DOUBLE_SPECIAL.search(text, position)
        if special is None:
            pieces.append(text[position:])
            return length
        pieces.append(text[position : special.start()])
        position = special.start()
        if text[position] == '"':
            return position + 1
        following = text[position + 1 : position + 2]
        if following in ('"', "\\"):
            pieces.append(following)
            position += 2
        else:  # a backslash before anything else stays
            pieces.append("\\")
            position += 1
    return length


@record(frozen=True)
class JobParameters:
    """``jobPars`` split into what the payload gets and the image the pilot uses."""

    payload_args: str
    image: str | None


def split_parameters(job_pars: str) -> JobParameters:
    """Take every ``--containerImage <image>`` / ``--containerImage=<image>`` out of ``job_pars``.

    The rest of the text is kept byte for byte (only the option, its value and the
    blanks after them go), so the shell still sees the same words.  The option
    without a value, or given twice with different images, is a definition error.
    Words that cannot be the option are skipped by one regular expression; only the
    few that might be are unquoted.
    """
    if OPTION not in job_pars.translate(_QUOTING):  # no word can be the option
        return JobParameters(job_pars, None)
    kept: list[str] = []
    cut_from = position = 0
    image: str | None = None
    while True:
        skipped = _SKIP.match(job_pars, position)
        assert skipped is not None  # it matches the empty string
        word = _WORD.match(job_pars, skipped.end())
        if word is None:
            break
        start, end, value = word.start(), word.end(), unquote(word.group())
        if value == OPTION:
            following = _WORD.search(job_pars, end)
            if following is None:
                raise JobDefinitionError(ErrorCode.CONVERSIONFAILURE, "jobPars", f"{OPTION} without an image")
            found, end = unquote(following.group()), following.end()
        elif value.startswith(OPTION + "="):
            found = value[len(OPTION) + 1 :]
        else:
            position = end
            continue
        if not found:
            raise JobDefinitionError(ErrorCode.CONVERSIONFAILURE, "jobPars", f"{OPTION} with an empty image")
        if image is not None and found != image:
            raise JobDefinitionError(
                ErrorCode.CONVERSIONFAILURE,
                "jobPars",
                f"{OPTION} given twice: {shown(image)}, {shown(found)}",
            )
        image = found
        kept.append(job_pars[cut_from:start])
        while end < len(job_pars) and job_pars[end] in " \t":
            end += 1
        cut_from = position = end
    if image is None:
        return JobParameters(job_pars, None)
    kept.append(job_pars[cut_from:])
    return JobParameters("".join(kept), check_image(image, "jobPars"))


def check_image(image: str, field_name: str) -> str:
    """``image`` unless it is a path that names the host's own root or escapes upwards.

    Apptainer runs a directory as a sandbox image: ``/``, ``//``, ``/.``, ``/usr/..``
    would run the payload on the host's whole file system, outside any container.
    Checked on the text (nothing exists yet when a job arrives): the path is normalised
    (``.``/``..``/repeated slashes) and refused when it is the root, lies in ``/proc``
    (whose ``root``/``cwd`` links lead back to the host), or, relative to the work
    directory, climbs out of it.  Images named by URI (``docker://``, ``oras://``...) pass.
    """
    if _URI.match(image):
        return image
    if image.startswith("-"):
        raise JobDefinitionError(
            ErrorCode.IMAGENOTFOUND, field_name, f"image {shown(image)} reads as an option"
        )
    normal = (
        posixpath.normpath("/" + image.lstrip("/")) if image.startswith("/") else posixpath.normpath(image)
    )
    if normal == "/" or normal == "/proc" or normal.startswith("/proc/"):
        raise JobDefinitionError(
            ErrorCode.IMAGENOTFOUND, field_name, f"image {shown(image)} is the host's root, not an image"
        )
    if normal == ".." or normal.startswith("../"):
        raise JobDefinitionError(
            ErrorCode.IMAGENOTFOUND, field_name, f"image {shown(image)} lies outside the work directory"
        )
    return image


def check_command_size(transformation: str, job_pars: str) -> None:
    """Refuse a transformation or parameters that cannot fit in one ``bash -c`` argument."""
    trf_size = utf8_size(transformation)
    if trf_size > MAX_TRANSFORMATION_BYTES:
        raise JobDefinitionError(
            ErrorCode.CONVERSIONFAILURE,
            "transformation",
            f"{trf_size} bytes; at most {MAX_TRANSFORMATION_BYTES} (PATH_MAX)",
        )
    size = utf8_size(shlex.quote(transformation)) + 1 + utf8_size(job_pars)
    if size > MAX_COMMAND_BYTES:
        raise JobDefinitionError(
            ErrorCode.CONVERSIONFAILURE,
            "jobPars",
            f"the payload command would be {size} bytes; at most {MAX_COMMAND_BYTES} fit in its "
            f"'bash -c' argument (Linux MAX_ARG_STRLEN {MAX_ARG_STRLEN} less {COMMAND_HEADROOM} for a prefix)",
        )
