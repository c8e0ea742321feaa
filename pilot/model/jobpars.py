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
seconds on a single 1 MB word, on the reactor thread.  ``shell_words`` splits the text
the way ``shlex.split`` does (POSIX quoting, whitespace-separated words) in one pass,
jumping between quote and escape characters with compiled searches.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass

from pilot.errorcodes import ErrorCode
from pilot.model.fields import JobDefinitionError, shown, utf8_size

MAX_ARG_STRLEN = 131072
#: Room left in the ``bash -c`` argument for an experiment's prefix to the command.
COMMAND_HEADROOM = 8192
MAX_COMMAND_BYTES = MAX_ARG_STRLEN - 1 - COMMAND_HEADROOM
MAX_TRANSFORMATION_BYTES = 4096

OPTION = "--containerImage"

_SPACE = " \t\r\n"  # shlex's whitespace: what separates words
_WORD = re.compile(r"[^ \t\r\n]")
_TOP_SPECIAL = re.compile(r"[ \t\r\n'\"\\]")
_DOUBLE_SPECIAL = re.compile(r'["\\]')
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


@dataclass(frozen=True)
class Word:
    """One shell word: where it is in the text (``[start, end)``) and its unquoted value."""

    start: int
    end: int
    value: str


def shell_words(text: str) -> Iterator[Word]:
    """The words of ``text`` as ``shlex.split`` sees them, in time linear in ``len(text)``.

    Outside quotes a backslash escapes the next character; ``'...'`` is literal;
    inside ``"..."`` a backslash escapes only ``"`` and ``\\``.  Where ``shlex`` raises
    (an unclosed quote, a final backslash) the word runs to the end of the text: the
    pilot only looks for its option, and bash reports the error when the payload runs.
    Every step of the loops below consumes at least one character.
    """
    length = len(text)
    position = 0
    while True:
        found = _WORD.search(text, position)
        if found is None:
            return
        start = position = found.start()
        pieces: list[str] = []
        while position < length:
            special = _TOP_SPECIAL.search(text, position)
            stop = special.start() if special is not None else length
            pieces.append(text[position:stop])
            position = stop
            if position == length or text[position] in _SPACE:
                break
            char = text[position]
            if char == "\\":
                pieces.append(text[position + 1 : position + 2])
                position = min(position + 2, length)
            elif char == "'":
                close = text.find("'", position + 1)
                close = length if close < 0 else close
                pieces.append(text[position + 1 : close])
                position = min(close + 1, length)
            else:
                position = _double_quoted(text, position + 1, pieces)
        yield Word(start, position, "".join(pieces))


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


@dataclass(frozen=True)
class JobParameters:
    """``jobPars`` split into what the payload gets and the image the pilot uses."""

    payload_args: str
    image: str | None


def split_parameters(job_pars: str) -> JobParameters:
    """Take every ``--containerImage <image>`` / ``--containerImage=<image>`` out of ``job_pars``.

    The rest of the text is kept byte for byte (only the option, its value and the
    blanks after them go), so the shell still sees the same words.  The option
    without a value, or given twice with different images, is a definition error.
    """
    if OPTION not in job_pars:  # the usual case, at C speed
        return JobParameters(job_pars, None)
    words = shell_words(job_pars)
    kept: list[str] = []
    cut_from = 0
    image: str | None = None
    for word in words:
        if word.value == OPTION:
            value = next(words, None)
            if value is None:
                raise JobDefinitionError(ErrorCode.CONVERSIONFAILURE, "jobPars", f"{OPTION} without an image")
            found, end = value.value, value.end
        elif word.value.startswith(OPTION + "="):
            found, end = word.value[len(OPTION) + 1 :], word.end
        else:
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
        kept.append(job_pars[cut_from : word.start])
        while end < len(job_pars) and job_pars[end] in " \t":
            end += 1
        cut_from = end
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
