"""The event-range channel's messages between the pilot and an event-service payload.

The grammar is the one ATLAS payloads (AthenaMP and its successors) already speak,
one UTF-8 message per line:

payload → pilot
    ``Ready for events``                          a worker wants a range
    ``<output path>,ID:<range id>,CPU:<s>,WALL:<s>``  a range is done; its output file
    ``ERR_<CODE> <range id>: <text>``             a range failed

pilot → payload
    a JSON list of range dictionaries (as the server sent them), or ``No more events``.

Everything a payload sends is untrusted: this module only parses (a message that does
not fit is a ``ChannelMessageError`` naming what was wrong, never an exception from
deep inside), and the caller checks what a message refers to (that the range was
handed to that worker, that the output path lies in the job's directory).  Lines are
bounded: a payload that writes without newlines cannot grow the pilot's memory.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from pilot.util.records import record

READY_FOR_EVENTS = "Ready for events"
NO_MORE_EVENTS = "No more events"

#: Longest line accepted from a payload (an output path plus a range id fits many times).
MAX_LINE_BYTES = 64 * 1024

#: ``ERR_ATHENAMP_PARSE`` carries the range's dictionary text instead of its id.
#: AthenaMP quotes it and often writes it as a Python 2 repr (``u'eventRangeID': u'...'``).
_RANGE_ID_IN_TEXT = re.compile(r"""u?["']eventRangeID["']\s*:\s*u?["']([^"']+)["']""")
_ERROR_CODE = re.compile(r"ERR_[A-Z0-9_]+")


class ChannelMessageError(ValueError):
    """A payload's message that does not fit the grammar (the text says how)."""


@record(frozen=True)
class ReadyForEvents:
    """A payload worker asks for a range."""


@record(frozen=True)
class RangeDone:
    """A payload worker finished a range: its output file and the CPU and wall seconds spent."""

    range_id: str
    output: str
    cpu_s: float
    wall_s: float


@record(frozen=True)
class RangeFailed:
    """A payload worker failed a range (``code`` such as ``ERR_ATHENAMP_PROCESS``)."""

    range_id: str
    code: str
    text: str


PayloadMessage = ReadyForEvents | RangeDone | RangeFailed


def _seconds(field: str, value: str, line: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ChannelMessageError(f"{field} is not a number in {line!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ChannelMessageError(f"{field} must be a finite number >= 0 in {line!r}")
    return seconds


def _parse_done(line: str) -> RangeDone:
    # the path may itself hold commas: the three tagged fields are taken from the right
    parts = line.rsplit(",", 3)
    if len(parts) != 4:
        raise ChannelMessageError(f"not '<path>,ID:<id>,CPU:<s>,WALL:<s>': {line!r}")
    output, range_id, cpu, wall = parts
    for tag, value in (("ID:", range_id), ("CPU:", cpu), ("WALL:", wall)):
        if not value.startswith(tag):
            raise ChannelMessageError(f"expected {tag} in {line!r}")
    range_id = range_id[3:]
    if not output or not range_id:
        raise ChannelMessageError(f"empty output path or range id in {line!r}")
    return RangeDone(
        range_id=range_id,
        output=output,
        cpu_s=_seconds("CPU", cpu[4:], line),
        wall_s=_seconds("WALL", wall[5:], line),
    )


def _parse_failed(line: str) -> RangeFailed:
    code, _, rest = line.partition(" ")
    if not _ERROR_CODE.fullmatch(code):
        raise ChannelMessageError(f"not an ERR_<CODE> message: {line!r}")
    found = _RANGE_ID_IN_TEXT.search(rest)
    if found is not None:
        return RangeFailed(range_id=found.group(1), code=code, text=rest)
    range_id, separator, text = rest.partition(": ")
    if not separator:
        range_id, separator, text = rest.partition(":")
    range_id = range_id.strip()
    if not separator or not range_id or " " in range_id or range_id[0] in "{\"'":
        # ``ERR_ATHENAMP_PARSE <text>`` without a range's id: nothing to fail
        raise ChannelMessageError(f"no range id in {line[:200]!r}")
    return RangeFailed(range_id=range_id, code=code, text=text.strip())


def parse_payload_message(line: str) -> PayloadMessage:
    """One line from a payload (without its newline) as a message."""
    line = line.rstrip("\r")
    if line == READY_FOR_EVENTS:
        return ReadyForEvents()
    if line.startswith("ERR_"):
        return _parse_failed(line)
    if ",ID:" in line:
        return _parse_done(line)
    raise ChannelMessageError(f"unknown message {line[:200]!r}")


def ranges_message(ranges: Sequence[Mapping[str, Any]]) -> str:
    """The pilot's answer to ``Ready for events``: the ranges as one JSON line."""
    if not ranges:
        raise ValueError("an empty list of ranges is not a message: send NO_MORE_EVENTS")
    return json.dumps(list(ranges), separators=(",", ":"))


class LineSplitter:
    """Bytes from a stream in, complete UTF-8 lines out, each at most ``max_bytes``.

    A line that is too long or not UTF-8 comes out as a ``ChannelMessageError`` in its
    place, and the lines after it still come out: one bad line never stalls the stream.
    The rest of an overlong line is dropped as it arrives, never buffered.
    """

    def __init__(self, max_bytes: int = MAX_LINE_BYTES) -> None:
        self._max = max_bytes
        self._buffer = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> Iterator[str | ChannelMessageError]:
        """The lines (or errors in their place) that ``data`` completes."""
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if self._discarding:
                if end < 0:
                    self._buffer.clear()
                    return
                del self._buffer[: end + 1]
                self._discarding = False
                continue
            if end < 0:
                if len(self._buffer) > self._max:
                    self._buffer.clear()
                    self._discarding = True
                    yield self._too_long()
                return
            raw = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if len(raw) > self._max:
                yield self._too_long()
                continue
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError:
                yield ChannelMessageError("a line that is not UTF-8")

    def _too_long(self) -> ChannelMessageError:
        return ChannelMessageError(f"a line longer than {self._max} bytes")

    @property
    def pending(self) -> int:
        """Bytes of an unfinished line."""
        return len(self._buffer)
