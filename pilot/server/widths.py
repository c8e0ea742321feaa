"""Fit every string the pilot sends into the server's column for it.

The PanDA server stores an update's strings in fixed-width columns, and a value that
does not fit is lost without the pilot hearing of it: the debug tail (``stdout`` into
``jobsDebug.stdOut``, 2048) is dropped while the update is answered ``StatusCode`` 0,
and a value too wide for a ``jobsActive4`` column the server does not slice itself
(``pilotTiming``, ``schedulerID``, ``cpuConsumptionUnit``), or a diagnostic the server
slices to 500 *characters* when the column holds 500 *bytes*, rolls the whole update
back (``StatusCode`` 30): a final update that can never be stored.

The production schema is Oracle ``VARCHAR2(n BYTE)``; PostgreSQL and MySQL count
characters.  So every width here is in bytes of UTF-8, which can only be larger than
the number of characters: a value that fits in bytes fits on every backend.  Text is
also made storable everywhere: lone surrogates (not Unicode, refused by every driver)
and NUL (refused by PostgreSQL) become U+FFFD.

How a value is cut depends on what it holds, so what is kept stays readable:

* ``tail_lines``: the debug tail keeps its *end* (the newest lines), cut at a line
  start, under a first line that says how much was cut;
* ``head_lines``: a multi-line diagnostic keeps its first lines and ends with that note;
* ``head_items``: ``jobMetrics`` (``key=value`` items separated by spaces) and
  ``pilotTiming`` (``|``-separated) drop whole items from the end, so the server's
  parsing of the items (``leak=``, ``chi2=`` ...) never meets half an item;
* ``head_chars``: everything else keeps its start, cut between two characters (never
  inside a UTF-8 sequence), with ``...`` where it fits.

A value that already fits (and is storable) is returned unchanged, so fitting twice
changes nothing.  Redacting secrets is the caller's job and comes first: a redaction
marker may lengthen the text.  Pure functions on values: no I/O, no logging.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, TypeVar

from pilot.util.records import record

if TYPE_CHECKING:  # for the signatures only: at run time this module needs nothing of the client
    from _typeshed import DataclassInstance

    from pilot.server.client import JobRequest, JobUpdate

    D = TypeVar("D", bound=DataclassInstance)

ELLIPSIS = "..."
REPLACEMENT = "\ufffd"


def utf8_size(text: str) -> int:
    """The size of ``text`` in UTF-8: what an Oracle ``VARCHAR2(n BYTE)`` column counts."""
    return len(text.encode("utf-8", "surrogatepass"))


def storable(text: str) -> str:
    """``text`` with lone surrogates and NUL replaced by U+FFFD (unchanged when there are none)."""
    if "\0" not in text:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            pass
        else:
            return text
    return "".join(REPLACEMENT if c == "\0" or "\ud800" <= c <= "\udfff" else c for c in text)


def cut_note(size: int) -> str:
    """The line that stands where ``size`` bytes of text were cut."""
    return f"[{size} bytes cut]"


def head_chars(text: str, width: int) -> str:
    """The start of ``text`` in at most ``width`` bytes, ending in ``...`` where that fits."""
    text = storable(text)
    data = text.encode("utf-8")
    if len(data) <= width:
        return text
    room = width - len(ELLIPSIS) if width > len(ELLIPSIS) else width
    # data is valid UTF-8, so "ignore" drops only the character the cut went through
    kept = data[: max(room, 0)].decode("utf-8", "ignore")
    return kept + ELLIPSIS if width > len(ELLIPSIS) else kept


def head_items(text: str, width: int, separator: str) -> str:
    """The first whole ``separator``-separated items of ``text`` that fit in ``width`` bytes.

    The result is ``text`` itself, or a prefix of it that ends just before a separator
    (possibly empty): an item is either kept whole or dropped.
    """
    text = storable(text)
    data = text.encode("utf-8")
    if len(data) <= width:
        return text
    mark = separator.encode("utf-8")
    # a separator starting at byte p <= width leaves a prefix of p bytes, which fits
    end = data.rfind(mark, 0, width + len(mark))
    end = end if 0 <= end <= width else 0
    return data[:end].decode("utf-8").rstrip(separator)


def head_lines(text: str, width: int) -> str:
    """The first whole lines of ``text`` and a note of what was cut, in at most ``width`` bytes.

    Single-line text, or text whose first line alone is too long, keeps its start
    instead (``head_chars``).
    """
    text = storable(text)
    data = text.encode("utf-8")
    total = len(data)
    if total <= width:
        return text
    room = width - len(cut_note(total))  # the note can only get shorter than this one
    end = data.rfind(b"\n", 0, max(room, 0))
    if end < 0:
        return head_chars(text, width)
    kept = data[: end + 1]
    return kept.decode("utf-8") + cut_note(total - len(kept))


def tail_lines(text: str, width: int) -> str:
    """A note of what was cut, then the last whole lines of ``text``, in at most ``width`` bytes.

    When even the last line is too long, its end is kept, cut between two characters.
    """
    text = storable(text)
    data = text.encode("utf-8")
    total = len(data)
    if total <= width:
        return text
    room = width - len(cut_note(total)) - 1  # the note and its newline
    if room <= 0:
        return data[total - width :].decode("utf-8", "ignore") if width > 0 else ""
    newline = data.find(b"\n", total - room - 1)
    if 0 <= newline < total - 1:
        kept = data[newline + 1 :]
    else:  # the last line alone does not fit: keep its end, never half a character
        kept = data[total - room :]
    body = kept.decode("utf-8", "ignore")
    return cut_note(total - utf8_size(body)) + "\n" + body


def items(separator: str) -> Callable[[str, int], str]:
    """``head_items`` for one separator."""
    return lambda text, width: head_items(text, width, separator)


@record(frozen=True)
class Fit:
    """How one field is fitted: its column's width in bytes and how its text is cut."""

    column: str
    width: int
    cut: Callable[[str, int], str]

    def __call__(self, text: str) -> str:
        return self.cut(text, self.width)


#: ``JobUpdate`` field -> its column (official schema, panda-database ``schema/oracle/ATLAS_PANDA.sql``).
UPDATE_FITS: Mapping[str, Fit] = {
    "stdout": Fit("jobsDebug.stdOut", 2048, tail_lines),
    "pilot_log": Fit("PANDALOG.MESSAGE", 4000, tail_lines),
    "pilot_error_diag": Fit("jobsActive4.pilotErrorDiag", 500, head_lines),
    "exe_error_diag": Fit("jobsActive4.exeErrorDiag", 500, head_lines),
    "job_metrics": Fit("jobsActive4.jobMetrics", 500, items(" ")),
    "pilot_timing": Fit("jobsActive4.pilotTiming", 100, items("|")),
    "batch_id": Fit("jobsActive4.batchID", 80, head_chars),
    "job_sub_status": Fit("jobsActive4.jobSubStatus", 80, head_chars),
    "scheduler_id": Fit("jobsActive4.schedulerID", 128, head_chars),
    "cpu_consumption_unit": Fit("jobsActive4.cpuConsumptionUnit", 128, head_chars),
    "pilot_id": Fit("jobsActive4.pilotID", 200, head_chars),
    "cpu_architecture_level": Fit("jobsActive4.cpu_architecture_level", 20, head_chars),
    "node": Fit("jobsActive4.modificationHost", 128, head_chars),
}

#: ``JobRequest`` field -> the column ``getJobs`` writes it to, unsliced, when it dispatches a job.
REQUEST_FITS: Mapping[str, Fit] = {
    "node": Fit("jobsActive4.modificationHost", 128, head_chars),
    "computing_element": Fit("jobsActive4.computingElement", 128, head_chars),
}


def _fitted(value: D, fits: Mapping[str, Fit]) -> D:
    """``value`` with its fields named in ``fits`` fitted (the same object if all fit)."""
    changes = {}
    for name, fit in fits.items():
        text = getattr(value, name)
        if isinstance(text, str):
            fitted = fit(text)
            if fitted != text:
                changes[name] = fitted
    return replace(value, **changes) if changes else value


def fit_update(update: JobUpdate) -> JobUpdate:
    """``update`` with every string that has a column fitted into it (the same object if all fit)."""
    return _fitted(update, UPDATE_FITS)


def fit_request(request: JobRequest) -> JobRequest:
    """``request`` with ``node`` and ``computing_element`` fitted (a longer value means no job, ever)."""
    return _fitted(request, REQUEST_FITS)


def fitted_fields(original: object, fitted: object) -> tuple[str, ...]:
    """The fields ``fit_update``/``fit_request`` changed (for the caller's log: names, never values)."""
    names = UPDATE_FITS.keys() | REQUEST_FITS.keys()
    return tuple(
        sorted(
            name
            for name in names
            if hasattr(original, name) and getattr(original, name) != getattr(fitted, name)
        )
    )
