"""The reference event-service payload: an ATLAS-like payload for the event-range channel.

A standalone Python 3 program (standard library only, no txpilot imports, so it runs
inside a container too) that speaks the pilot's event-range grammar the way AthenaMP
workers do: one UTF-8 message per line on a Unix-domain ``SOCK_STREAM`` socket, one
connection per worker.

Each worker loops: it sends ``Ready for events`` and reads one line.  ``No more events``
ends it (exit 0); otherwise the line is a JSON list of ranges, each a dictionary with
``eventRangeID``, ``startEvent``, ``lastEvent``, ``LFN`` and optionally ``GUID`` and
``scope``.  For each range the worker "processes" the events ``startEvent..lastEvent``,
writes an output file whose content is a function of the range alone, and reports::

    <absolute output path>,ID:<range id>,CPU:<s>,WALL:<s>

CPU is the worker's user + system time spent on the range (``os.times``), WALL the
elapsed time, both in seconds with three decimals.  The output file is
``<output dir>/<range id>.pool.root`` (characters outside ``A-Za-z0-9._-`` become ``_``
and a short hash of the real id is appended when that changed the name); it is written
to a temporary name, fsync'ed and renamed into place, so no range is reported with a
half-written file.

A failed range is reported as ``ERR_TE_FATAL <range id>: <text>`` and leaves no output
file.  An answer that is not a JSON list, or a range in it that is not a valid range
dictionary, is reported as ``ERR_ATHENAMP_PARSE <text>: Wrong format (<why>)``, where
``<text>`` is the range's dictionary as compact JSON (``eventRangeID`` first), or the
offending line itself (at most 1000 characters); the worker then asks for more.

Options:

``--channel PATH``
    the channel's socket path (default: the ``PILOT_EVENTRANGECHANNEL`` environment
    variable; exit status 2 when neither is set).
``--workers N``
    forked worker processes, each with its own connection (default 1).  The parent
    waits for all of them and exits 0 when all exited 0, else with the first non-zero
    status it saw (128 + the signal number for a worker killed by a signal).
``--output-dir DIR``
    where the output files go (default: the current directory).
``--output-bytes N``
    the size of each output file (default 256).
``--event-seconds S``
    seconds of sleep per event (default 0).
``--fail-ranges K``
    fail every K-th range a worker takes (its K-th, 2K-th, ...).
``--fail-ids ID,ID``
    fail these ranges.
``--crash-after N``
    a worker that takes its N-th range kills itself with SIGKILL before reporting it.
``--crash-exit CODE``
    with ``--crash-after``: at that point, close the connection and exit with CODE
    instead of SIGKILL (the range in hand is not reported either).
``--ignore-sigterm``
    workers and parent ignore SIGTERM.  Without it, the parent passes SIGTERM on to its
    workers, and a worker finishes and reports the range in hand, then exits 0 without
    asking for more (the rest of a multi-range answer stays unreported); a worker that
    has no range in hand (waiting for an answer) exits 0 at once.

A worker exits 3 when the channel cannot be reached or closes under it.  Progress goes
to standard output, one line per event of note (``worker <n> pid <pid> started <id>``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, NoReturn

READY_FOR_EVENTS = "Ready for events"
NO_MORE_EVENTS = "No more events"

#: Exit status of a worker whose channel could not be reached or closed under it.
EXIT_CHANNEL_CLOSED = 3
#: Exit status for a usage error (no channel given).
EXIT_USAGE = 2

#: The longest offending text quoted back in an ``ERR_ATHENAMP_PARSE`` message.
MAX_QUOTED = 1000
#: The longest answer line read from the pilot: a longer one is a parse error.
MAX_ANSWER_BYTES = 16 * 1024 * 1024

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class ChannelClosed(Exception):
    """The pilot's end of the channel is gone."""


class StopRequested(Exception):
    """SIGTERM arrived while the worker held no range: stop now."""


class RangeError(ValueError):
    """A range dictionary that cannot be processed (the text says why)."""


@dataclass(frozen=True)
class EventRange:
    """One range as the payload understands it."""

    range_id: str
    start: int
    last: int
    lfn: str
    guid: str
    scope: str


@dataclass(frozen=True)
class Options:
    channel: str
    workers: int
    output_dir: str
    output_bytes: int
    event_seconds: float
    fail_every: int
    fail_ids: frozenset[str]
    crash_after: int
    crash_exit: int | None
    ignore_sigterm: bool


# -- pure functions (the tests use them to compute what to expect) -------------------


def output_name(range_id: str) -> str:
    """The output file's name for ``range_id``: safe characters only, never colliding."""
    safe = _UNSAFE.sub("_", range_id)[:200]
    if safe != range_id or safe.startswith("."):
        digest = hashlib.sha256(range_id.encode("utf-8")).hexdigest()[:12]
        safe = f"{safe.lstrip('.') or 'range'}-{digest}"
    return f"{safe}.pool.root"


def process_events(event_range: EventRange, event_seconds: float = 0.0) -> str:
    """Process the range's events (a hash each, and a sleep): a digest, the same for the same range."""
    digest = hashlib.sha256(f"{event_range.lfn}\0{event_range.guid}\0".encode())
    for event in range(event_range.start, event_range.last + 1):
        digest.update(event.to_bytes(8, "little", signed=True))
        if event_seconds > 0:
            time.sleep(event_seconds)
    return digest.hexdigest()


def output_content(event_range: EventRange, size: int, digest: str | None = None) -> bytes:
    """The output file's bytes: a header naming the range, then filler, exactly ``size`` long.

    ``digest``: what ``process_events`` gave for the range (computed here when not given).
    """
    if digest is None:
        digest = process_events(event_range)
    header = (
        f"txpilot-es-payload range={event_range.range_id} events={event_range.start}..{event_range.last}"
        f" lfn={event_range.lfn} guid={event_range.guid} scope={event_range.scope} digest={digest}\n"
    ).encode()
    chunks = [header]
    length = len(header)
    seed = hashlib.sha256(header).digest()
    counter = 0
    while length < size:
        block = hashlib.sha256(seed + counter.to_bytes(8, "little")).digest()
        chunks.append(block)
        length += len(block)
        counter += 1
    return b"".join(chunks)[:size]


def _event_number(value: Any, field: str) -> int:
    if isinstance(value, bool):
        raise RangeError(f"{field} is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,18}", value.strip()):
        return int(value)
    raise RangeError(f"{field} is not an integer")


def parse_range(item: Any) -> EventRange:
    """One element of the pilot's list as a range, or ``RangeError``."""
    if not isinstance(item, dict):
        raise RangeError("a range is not a dictionary")
    missing = [key for key in ("eventRangeID", "startEvent", "lastEvent", "LFN") if key not in item]
    if missing:
        raise RangeError(f"missing {', '.join(missing)}")
    range_id = item["eventRangeID"]
    if not isinstance(range_id, str) or not range_id or re.search(r"[\s,]", range_id):
        raise RangeError("eventRangeID must be a non-empty string without blanks or commas")
    start = _event_number(item["startEvent"], "startEvent")
    last = _event_number(item["lastEvent"], "lastEvent")
    if last < start:
        raise RangeError("lastEvent < startEvent")
    texts = {key: item.get(key, "") for key in ("LFN", "GUID", "scope")}
    for key, value in texts.items():
        if not isinstance(value, str) or "\n" in value:
            raise RangeError(f"{key} must be a one-line string")
    return EventRange(range_id, start, last, texts["LFN"], texts["GUID"], texts["scope"])


def quoted(item: Any) -> str:
    """A range's text for ``ERR_ATHENAMP_PARSE``: compact JSON, ``eventRangeID`` first."""
    if isinstance(item, dict) and "eventRangeID" in item:
        item = {"eventRangeID": item["eventRangeID"], **item}
    return json.dumps(item, separators=(",", ":"), default=str)[:MAX_QUOTED]


def parse_error(text: str, why: str) -> str:
    return f"ERR_ATHENAMP_PARSE {text[:MAX_QUOTED]}: Wrong format ({why})"


def done_message(path: str, range_id: str, cpu_s: float, wall_s: float) -> str:
    return f"{path},ID:{range_id},CPU:{max(cpu_s, 0.0):.3f},WALL:{max(wall_s, 0.0):.3f}"


def failed_message(range_id: str, text: str) -> str:
    return f"ERR_TE_FATAL {range_id}: {text}"


# -- a worker -------------------------------------------------------------------------


def write_atomically(path: str, content: bytes) -> None:
    """``content`` at ``path``: a temporary name, fsync, rename, fsync of the directory."""
    directory = os.path.dirname(path)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(temporary)
        raise
    os.close(fd)
    os.replace(temporary, path)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


class Worker:
    """One worker process's loop on its own connection."""

    def __init__(self, number: int, options: Options) -> None:
        self.number = number
        self.options = options
        self.taken = 0
        self.in_hand = False
        self.stopping = False
        self._socket: socket.socket | None = None
        self._buffer = bytearray()
        self._overlong = False

    # signals --------------------------------------------------------------------------

    def on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        if not self.in_hand:
            raise StopRequested()

    # the channel ----------------------------------------------------------------------

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.options.channel)
        except OSError as exc:
            sock.close()
            raise ChannelClosed(f"cannot connect to {self.options.channel}: {exc}") from None
        self._socket = sock

    def send(self, line: str) -> None:
        assert self._socket is not None
        try:
            self._socket.sendall(line.encode("utf-8") + b"\n")
        except OSError as exc:
            raise ChannelClosed(f"sending: {exc}") from None

    def receive(self) -> bytes | None:
        """The next line from the pilot without its newline; None for an overlong line."""
        assert self._socket is not None
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                overlong, self._overlong = self._overlong, False
                return None if overlong or len(line) > MAX_ANSWER_BYTES else line
            if len(self._buffer) > MAX_ANSWER_BYTES:  # drop it as it comes, never hold it
                self._buffer.clear()
                self._overlong = True
            try:
                data = self._socket.recv(65536)
            except OSError as exc:
                raise ChannelClosed(f"receiving: {exc}") from None
            if not data:
                raise ChannelClosed("the pilot closed the channel")
            self._buffer += data

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    # the work -------------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(f"worker {self.number} pid {os.getpid()} {text}", flush=True)

    def run(self) -> int:
        """The worker's exit status."""
        self.connect()
        self.say("connected")
        while not self.stopping:
            self.send(READY_FOR_EVENTS)
            raw = self.receive()
            if raw is not None and raw.rstrip(b"\r") == NO_MORE_EVENTS.encode():
                self.say("no more events")
                return 0
            ranges = self._ranges(raw)
            for item in ranges:
                self.in_hand = True
                status = self._one(item)
                self.in_hand = False
                if status is not None:
                    return status
                if self.stopping:
                    break
        self.say("stopping on SIGTERM")
        return 0

    def _ranges(self, raw: bytes | None) -> list[Any]:
        """The answer's list of ranges, or [] after reporting why it is not one."""
        if raw is None:
            self.send(parse_error("an answer", f"longer than {MAX_ANSWER_BYTES} bytes"))
            return []
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            self.send(parse_error(raw.decode("utf-8", "replace"), "not UTF-8"))
            return []
        try:
            answer = json.loads(line)
        except ValueError as exc:
            self.send(parse_error(line, f"not JSON: {exc}"))
            return []
        if not isinstance(answer, list) or not answer:
            self.send(parse_error(line, "not a non-empty JSON list of ranges"))
            return []
        return answer

    def _one(self, item: Any) -> int | None:
        """Take one range: report it (None), or return the status to exit with (a crash)."""
        started_wall = time.monotonic()
        started_cpu = _cpu_seconds()
        try:
            event_range = parse_range(item)
        except RangeError as exc:
            self.send(parse_error(quoted(item), str(exc)))
            return None
        self.taken += 1
        self.say(f"started {event_range.range_id}")
        options = self.options
        if options.crash_after and self.taken == options.crash_after:
            self.say(f"crashing with range {event_range.range_id} in hand")
            if options.crash_exit is None:
                os.kill(os.getpid(), signal.SIGKILL)
            self.close()
            return options.crash_exit
        if options.fail_every and self.taken % options.fail_every == 0:
            self.send(failed_message(event_range.range_id, f"failing range {self.taken} of this worker"))
            return None
        if event_range.range_id in options.fail_ids:
            self.send(failed_message(event_range.range_id, "failing this range as asked"))
            return None
        digest = process_events(event_range, options.event_seconds)
        path = os.path.abspath(os.path.join(options.output_dir, output_name(event_range.range_id)))
        write_atomically(path, output_content(event_range, options.output_bytes, digest))
        self.send(
            done_message(
                path,
                event_range.range_id,
                _cpu_seconds() - started_cpu,
                time.monotonic() - started_wall,
            )
        )
        self.say(f"done {event_range.range_id}")
        return None


def run_worker(number: int, options: Options) -> int:
    """A forked worker's life: its SIGTERM handler in place, then SIGTERM unblocked, then work."""
    worker = Worker(number, options)
    if options.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, worker.on_sigterm)
    try:
        # a SIGTERM to the process group since the fork is pending: it is handled here
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        return worker.run()
    except StopRequested:
        worker.say("stopping on SIGTERM")
        return 0
    except ChannelClosed as exc:
        print(f"worker {number}: {exc}", file=sys.stderr, flush=True)
        return EXIT_CHANNEL_CLOSED
    finally:
        worker.close()


# -- the parent -----------------------------------------------------------------------


def _status(wait_status: int) -> int:
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.waitstatus_to_exitcode(wait_status)


def _child(number: int, options: Options) -> NoReturn:
    status = 70  # EX_SOFTWARE, should run_worker itself fail
    try:
        status = run_worker(number, options)
    except BaseException as exc:  # noqa: BLE001 - a forked child must reach os._exit
        print(f"worker {number}: {exc!r}", file=sys.stderr, flush=True)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def run(options: Options) -> int:
    """Fork the workers, wait for them: the payload's exit status."""
    children: set[int] = set()

    def forward(signum: int, frame: FrameType | None) -> None:
        for pid in list(children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, signal.SIG_IGN if options.ignore_sigterm else forward)
    sys.stdout.flush()
    sys.stderr.flush()
    for number in range(1, options.workers + 1):
        # no SIGTERM between fork and the worker's own handler: it would run `forward`
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        pid = os.fork()
        if pid == 0:
            _child(number, options)  # unblocks SIGTERM once its own handler is in place
        children.add(pid)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    first_failure = 0
    while children:
        pid, wait_status = os.wait()
        children.discard(pid)
        status = _status(wait_status)
        if status and not first_failure:
            first_failure = status
    return first_failure


def parse_options(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(description="An ATLAS-like event-service payload.")
    parser.add_argument("--channel", default=os.environ.get("PILOT_EVENTRANGECHANNEL"))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--output-dir", default=".")
    parser.add_argument("--output-bytes", type=int, default=256)
    parser.add_argument("--event-seconds", type=float, default=0.0)
    parser.add_argument("--fail-ranges", type=int, default=0)
    parser.add_argument("--fail-ids", default="")
    parser.add_argument("--crash-after", type=int, default=0)
    parser.add_argument("--crash-exit", type=int, default=None)
    parser.add_argument("--ignore-sigterm", action="store_true")
    args = parser.parse_args(argv)
    if not args.channel:
        parser.error("no channel: give --channel or set PILOT_EVENTRANGECHANNEL")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.output_bytes < 0 or args.fail_ranges < 0 or args.crash_after < 0:
        parser.error("--output-bytes, --fail-ranges and --crash-after must be >= 0")
    if not args.event_seconds >= 0:
        parser.error("--event-seconds must be >= 0")
    if args.crash_exit is not None and (not args.crash_after or not 0 <= args.crash_exit <= 255):
        parser.error("--crash-exit needs --crash-after and a status in 0..255")
    return Options(
        channel=args.channel,
        workers=args.workers,
        output_dir=args.output_dir,
        output_bytes=args.output_bytes,
        event_seconds=args.event_seconds,
        fail_every=args.fail_ranges,
        fail_ids=frozenset(i.strip() for i in args.fail_ids.split(",") if i.strip()),
        crash_after=args.crash_after,
        crash_exit=args.crash_exit,
        ignore_sigterm=args.ignore_sigterm,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_options(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
