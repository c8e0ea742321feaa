"""The payload's side of the pilot's event-range channel, for ``pilot.hpc.raydriver``.

``interfaces/event-channel.md`` is the contract; ``tests/es_payload.py`` the reference
payload, whose file names, output format and parse errors these functions reproduce, so a
driver on many nodes and a payload on one are the same thing to the pilot.  Here: the
grammar (pure functions), one worker's connection (asyncio streams: many connections
share one loop), and writing outputs whole.  Standard library only.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from collections.abc import Sequence
from typing import Any

from pilot.hpc.rayworker import RangeSpec

READY_FOR_EVENTS = "Ready for events"
NO_MORE_EVENTS = "No more events"

#: The longest answer line read from the pilot (as the reference payload).
MAX_ANSWER_BYTES = 16 * 1024 * 1024
#: The longest error text sent for a range (the pilot keeps 500 characters).
MAX_ERROR_TEXT = 500

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class ChannelClosed(Exception):
    """The pilot's end of a connection is gone (or was never there)."""


# -- the grammar (pure functions) ---------------------------------------------------------


def output_name(range_id: str) -> str:
    """The output file's name for ``range_id``: the reference payload's, safe and never colliding."""
    safe = _UNSAFE.sub("_", range_id)[:200]
    if safe != range_id or safe.startswith("."):
        digest = hashlib.sha256(range_id.encode("utf-8")).hexdigest()[:12]
        safe = f"{safe.lstrip('.') or 'range'}-{digest}"
    return f"{safe}.pool.root"


def done_message(path: str, range_id: str, cpu_s: float, wall_s: float) -> str:
    return f"{path},ID:{range_id},CPU:{max(cpu_s, 0.0):.3f},WALL:{max(wall_s, 0.0):.3f}"


def failed_message(range_id: str, text: str) -> str:
    """``ERR_TE_FATAL <id>: <text>``, the text on one line and bounded."""
    return f"ERR_TE_FATAL {range_id}: {' '.join(text.split())[:MAX_ERROR_TEXT]}"


def parse_error(text: str, why: str) -> str:
    return f"ERR_ATHENAMP_PARSE {text[:1000]}: Wrong format ({why})"


def _event_number(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,18}", value.strip()):
        return int(value)
    return None


def range_spec(item: Any) -> RangeSpec | str:
    """One element of the pilot's answer as a range, or why it is not one."""
    if not isinstance(item, dict):
        return "a range is not a dictionary"
    missing = [key for key in ("eventRangeID", "startEvent", "lastEvent", "LFN") if key not in item]
    if missing:
        return f"missing {', '.join(missing)}"
    range_id = item["eventRangeID"]
    if not isinstance(range_id, str) or not range_id or re.search(r"[\s,]", range_id):
        return "eventRangeID must be a non-empty string without blanks or commas"
    start, last = _event_number(item["startEvent"]), _event_number(item["lastEvent"])
    if start is None or last is None or last < start:
        return "startEvent and lastEvent must be integers, lastEvent >= startEvent"
    texts = [item.get(key, "") for key in ("LFN", "GUID", "scope")]
    if not all(isinstance(text, str) and "\n" not in text for text in texts):
        return "LFN, GUID and scope must be one-line strings"
    return (range_id, start, last, texts[0], texts[1], texts[2])


def parse_answer(line: str | None) -> tuple[list[RangeSpec] | None, list[str]]:
    """(the ranges, or None for ``No more events``; the parse errors to send back)."""
    if line is None:
        return [], [parse_error("an answer", f"longer than {MAX_ANSWER_BYTES} bytes")]
    if line == NO_MORE_EVENTS:
        return None, []
    try:
        answer = json.loads(line)
    except ValueError as exc:
        return [], [parse_error(line, f"not JSON: {exc}")]
    if not isinstance(answer, list) or not answer:
        return [], [parse_error(line, "not a non-empty JSON list of ranges")]
    specs: list[RangeSpec] = []
    errors: list[str] = []
    for item in answer:
        spec = range_spec(item)
        if isinstance(spec, str):
            if isinstance(item, dict) and "eventRangeID" in item:
                item = {"eventRangeID": item["eventRangeID"], **item}
            errors.append(parse_error(json.dumps(item, separators=(",", ":"), default=str), spec))
        else:
            specs.append(spec)
    return specs, errors


# -- outputs --------------------------------------------------------------------------------


def write_outputs(directory: str, items: Sequence[tuple[str, bytes]]) -> list[str | OSError]:
    """Each ``(name, bytes)`` written whole under ``directory``: its absolute path, or the error.

    Temporary name, fsync, rename; then one fsync of the directory for the whole batch, so a
    reported output survives a crash of this node.  Runs in a thread: fsync blocks.
    """
    results: list[str | OSError] = []
    for name, data in items:
        path = os.path.join(directory, name)
        temporary = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, path)
            results.append(path)
        except OSError as exc:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            results.append(exc)
    if any(isinstance(result, str) for result in results):
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:  # the renames may not last: no output of the batch is safe
            return [exc for _ in results]
    return results


# -- one connection ---------------------------------------------------------------------------


class Connection:
    """One worker's connection to the pilot's channel: lines out, answers in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, path: str) -> Connection:
        try:
            reader, writer = await asyncio.open_unix_connection(path, limit=MAX_ANSWER_BYTES)
        except OSError as exc:
            raise ChannelClosed(f"cannot connect to {path}: {exc}") from None
        return cls(reader, writer)

    def send(self, line: str) -> None:
        if not self._writer.is_closing():
            self._writer.write(line.encode("utf-8") + b"\n")

    async def flush(self) -> None:
        try:
            await self._writer.drain()
        except OSError as exc:
            raise ChannelClosed(f"sending: {exc}") from None

    async def ask(self) -> str | None:
        """``Ready for events``, then the answer without its newline (None: overlong)."""
        self.send(READY_FOR_EVENTS)
        await self.flush()
        overlong = False
        while True:
            try:
                raw = await self._reader.readuntil(b"\n")
            except asyncio.LimitOverrunError as exc:  # drop it as it comes, never hold it
                await self._reader.readexactly(exc.consumed)
                overlong = True
                continue
            except asyncio.IncompleteReadError:
                raise ChannelClosed("the pilot closed the channel") from None
            except OSError as exc:
                raise ChannelClosed(f"receiving: {exc}") from None
            if overlong:
                return None
            return raw[:-1].decode("utf-8", "replace").rstrip("\r")

    def close(self) -> None:
        """Close: what was written before goes out first."""
        self._writer.close()
