"""``python -m pilot.hpc.raydriver``: an event-service payload whose workers are Ray actors.

One pilot, one job, many nodes.  The pilot's event-service machinery is unchanged: this
program is an ordinary payload on the pilot's event-range channel
(``interfaces/event-channel.md``), started on the node the pilot runs on.  It places one
Ray actor per worker across the allocation's nodes (SPREAD, one CPU each) and, for each
actor, opens ONE connection to the channel, so to the pilot every actor is just another
payload worker: it asks for ranges, holds them and reports each one.

Per actor the driver keeps a short pipeline: while the actor works on one batch of
ranges, its connection already asks for the next and queues it on the actor, so the
actor never waits for the pilot, and at most two batches are ever in its hands (what a
lost actor can lose).  All actors are driven concurrently by one asyncio loop: a Ray
result is awaited as a future (no polling), answers are read from the sockets.

Outputs travel back through Ray as bytes (no file system shared between the nodes is
assumed) and are written here into ``--output-dir``: temporary name, fsync, rename, then
one fsync of the directory per batch, before the range is reported
``<path>,ID:<id>,CPU:<s>,WALL:<s>``; a failed range is ``ERR_TE_FATAL <id>: <text>``.
The file names are the reference payload's (``tests/es_payload.py``).

A lost actor (its process killed, its node gone) loses only what it held: each of those
ranges is reported ``ERR_TE_FATAL <id>: ray worker lost: ...`` and its connection is
closed; the other actors go on.  SIGTERM: nothing more is reported, the connections are
closed, Ray is shut down, exit 143.

Exit status: 0 once every connection still open got ``No more events`` and reported all
it held (lost actors included, their ranges reported failed); 1 when no actor started, or
every actor was lost; 2 for a usage error (no channel); 3 when the channel could not be
reached or the pilot closed it; 128 + signal on SIGTERM/SIGINT.

Only the standard library at import time; Ray is imported by ``connect`` (so this module
imports in any payload environment, and the tests use its functions without Ray).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pilot.hpc import rayworker
from pilot.hpc.channel import (
    ChannelClosed,
    Connection,
    done_message,
    failed_message,
    output_name,
    parse_answer,
    write_outputs,
)
from pilot.hpc.rayworker import Outcome, RangeSpec

EXIT_OK = 0
#: No actor could start, or every actor was lost: nothing left to do the work.
EXIT_NO_WORKERS = 1
EXIT_USAGE = 2
#: The channel could not be reached, or the pilot closed it under a worker.
EXIT_CHANNEL_CLOSED = 3

#: Batches one actor holds at most: the one it works on and the one queued behind it.
MAX_BATCHES = 2
#: How long a lost actor's connection waits for the answer to its last request, whose
#: ranges it must then report failed too.
LOST_ANSWER_WAIT = 10.0
#: How long the actors get to clean up at the end.
CLOSE_WAIT = 10.0


@dataclass(frozen=True)
class Options:
    """The command line, checked (``parse_options``)."""

    channel: str
    address: str
    local_cpus: int | None
    workers: int | None
    output_dir: str
    output_bytes: int
    event_seconds: float
    command: str | None
    pids_file: str | None
    temp_dir: str | None
    node_ip_address: str | None
    start_timeout: float


def say(text: str) -> None:
    print(f"raydriver: {text}", flush=True)


# -- one actor and its connection -------------------------------------------------------------


@dataclass
class Batch:
    specs: list[RangeSpec]
    result: asyncio.Future[list[Outcome]]


@dataclass
class Lane:
    """One actor, driven through its own connection.

    Two coroutines share the lane: the asker asks for a batch whenever the actor holds
    fewer than ``MAX_BATCHES`` and queues it on the actor at once; the collector takes
    each batch's result in order, writes the outputs and reports them, which frees a slot.
    So the actor always has its next batch queued behind the one it works on, and the
    pilot never sees more than two batches in this worker's hands.
    """

    number: int
    actor: Any
    connection: Connection
    options: Options
    executor: ThreadPoolExecutor
    lost_errors: tuple[type[BaseException], ...]
    task_error: type[BaseException]
    reported: int = 0
    failed: int = 0
    outcome: str = "running"
    #: Batches handed to this worker and not reported yet, oldest first.
    batches: deque[Batch] = field(default_factory=deque)
    #: Ranges handed to this worker after its actor was lost (never sent to it).
    unsent: list[RangeSpec] = field(default_factory=list)
    asking: bool = False
    lost: bool = False

    async def run(self) -> str:
        """``done`` (no more events, all reported), ``lost`` (the actor is gone) or ``closed``."""
        slots = asyncio.Semaphore(MAX_BATCHES)
        ready: asyncio.Queue[Batch | ChannelClosed | None] = asyncio.Queue()
        asker = asyncio.ensure_future(self._ask(slots, ready))
        try:
            self.outcome = await self._collect(slots, ready, asker)
        except ChannelClosed as exc:
            say(f"actor {self.number}: {exc}; {self._held()} range(s) unreported")
            self.outcome = "closed"
        finally:
            asker.cancel()
            for batch in self.batches:
                _discard(batch.result)
            self.connection.close()
        return self.outcome

    async def _ask(
        self, slots: asyncio.Semaphore, ready: asyncio.Queue[Batch | ChannelClosed | None]
    ) -> None:
        try:
            while True:
                await slots.acquire()
                if self.lost:
                    return
                self.asking = True
                try:
                    answer = await self.connection.ask()
                finally:
                    self.asking = False
                specs, errors = parse_answer(answer)
                for error in errors:
                    self.connection.send(error)
                if specs is None:
                    ready.put_nowait(None)
                    return
                if self.lost:  # handed to this worker after its actor died: failed with the rest
                    self.unsent.extend(specs)
                    return
                if not specs:
                    slots.release()
                    continue
                future = self.actor.process.remote(specs).future()
                batch = Batch(specs, asyncio.wrap_future(future))
                self.batches.append(batch)
                ready.put_nowait(batch)
        except ChannelClosed as exc:
            ready.put_nowait(exc)

    async def _collect(
        self,
        slots: asyncio.Semaphore,
        ready: asyncio.Queue[Batch | ChannelClosed | None],
        asker: asyncio.Future[None],
    ) -> str:
        while True:
            batch = await ready.get()
            if batch is None:  # "No more events", and every batch before it is reported
                return "done"
            if isinstance(batch, ChannelClosed):
                raise batch
            try:
                outcomes = await batch.result
            except self.task_error as exc:  # the method itself failed: this batch only
                outcomes = self._all_failed(batch, f"ray task failed: {_first_line(exc)}")
            except self.lost_errors as exc:
                await self._lost(exc, asker)
                return "lost"
            except Exception as exc:  # noqa: BLE001 - a result we cannot read fails its batch only
                outcomes = self._all_failed(batch, f"{type(exc).__name__}: {_first_line(exc)}")
            await self._report(batch, outcomes)
            self.batches.popleft()
            slots.release()

    @staticmethod
    def _all_failed(batch: Batch, text: str) -> list[Outcome]:
        return [(spec[0], None, text, 0.0, 0.0) for spec in batch.specs]

    async def _report(self, batch: Batch, outcomes: Sequence[Outcome]) -> None:
        by_id = {outcome[0]: outcome for outcome in outcomes}
        writes = [(o[0], output_name(o[0]), o[1]) for o in outcomes if o[1] is not None and not o[2]]
        written = await asyncio.get_running_loop().run_in_executor(
            self.executor, write_outputs, self.options.output_dir, [(name, data) for _, name, data in writes]
        )
        paths = {range_id: result for (range_id, _, _), result in zip(writes, written, strict=True)}
        for spec in batch.specs:
            range_id = spec[0]
            outcome = by_id.get(range_id)
            path = paths.get(range_id)
            if outcome is None:
                self._fail(range_id, "the ray worker returned no outcome for this range")
            elif isinstance(path, str):
                self.connection.send(done_message(path, range_id, outcome[3], outcome[4]))
                self.reported += 1
            elif isinstance(path, OSError):
                self._fail(range_id, f"cannot write the output: {path}")
            else:
                self._fail(range_id, outcome[2] or "no output")
        await self.connection.flush()

    def _fail(self, range_id: str, text: str) -> None:
        self.connection.send(failed_message(range_id, text))
        self.reported += 1
        self.failed += 1

    async def _lost(self, exc: BaseException, asker: asyncio.Future[None]) -> None:
        """Report every range this worker holds failed (the connection closes after)."""
        self.lost = True
        if self.asking:  # the answer's ranges, if any come, are this worker's too
            await asyncio.wait({asker}, timeout=LOST_ANSWER_WAIT)
        asker.cancel()
        held = [spec for batch in self.batches for spec in batch.specs] + self.unsent
        why = f"ray worker lost: {type(exc).__name__}: {_first_line(exc)}"
        for spec in held:
            self._fail(spec[0], why)
        say(f"actor {self.number} lost ({why}); {len(held)} range(s) in its hands reported failed")
        await self.connection.flush()

    def _held(self) -> int:
        return sum(len(batch.specs) for batch in self.batches) + len(self.unsent)


def _discard(future: asyncio.Future[Any]) -> None:
    """Drop a result nobody will read, without a "never retrieved" complaint."""
    if future.done():
        if not future.cancelled():
            future.exception()
    else:
        future.cancel()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


# -- the driver ---------------------------------------------------------------------------------


def alive_cpus(ray: Any) -> int:
    """The CPUs of the cluster's alive nodes: one actor each by default."""
    return int(sum(node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")))


def write_pids(path: str, started: Sequence[tuple[int, tuple[int, str, str]]]) -> None:
    """``<actor> <pid> <host> <node id>`` per started actor, the file appearing whole."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as stream:
        for number, (pid, host, node) in started:
            stream.write(f"{number} {pid} {host} {node}\n")
    os.replace(temporary, path)


async def start_actors(ray: Any, options: Options, count: int) -> list[tuple[int, Any, tuple[int, str, str]]]:
    """``count`` actors spread over the nodes; those that started within the timeout, described."""
    ray.cloudpickle.register_pickle_by_value(rayworker)  # the nodes need Ray, not txpilot
    remote = ray.remote(rayworker.RangeProcessor).options(
        num_cpus=1, scheduling_strategy="SPREAD", max_restarts=0, max_task_retries=0
    )
    actors = [
        remote.remote(options.output_bytes, options.event_seconds, options.command) for _ in range(count)
    ]
    waits = [
        asyncio.wait_for(asyncio.wrap_future(actor.describe.remote().future()), options.start_timeout)
        for actor in actors
    ]
    described = await asyncio.gather(*waits, return_exceptions=True)
    started = []
    for number, (actor, info) in enumerate(zip(actors, described, strict=True), start=1):
        if isinstance(info, BaseException):
            say(f"actor {number} did not start: {type(info).__name__}: {_first_line(info)}")
            ray.kill(actor, no_restart=True)
        else:
            pid, host, node = info
            say(f"actor {number} pid {pid} on {host} (node {node[:12]})")
            started.append((number, actor, (pid, host, node)))
    return started


async def _close_actors(actors: Sequence[Any]) -> None:
    """Let the actors clean their node-local scratch space (a command's outputs), briefly."""
    closing = asyncio.gather(
        *(asyncio.wrap_future(actor.close.remote().future()) for actor in actors), return_exceptions=True
    )
    try:
        await asyncio.wait_for(closing, CLOSE_WAIT)
    except TimeoutError:
        say("some actors did not clean up in time")


async def drive(ray: Any, options: Options) -> int:
    """Start the actors, drive one connection each until the job is done: the exit status."""
    count = options.workers or options.local_cpus or max(1, alive_cpus(ray))
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    say(f"driver on node {ray.get_runtime_context().get_node_id()[:12]}; {count} actor(s) on {nodes} node(s)")
    started = await start_actors(ray, options, count)
    if not started:
        say("no ray worker started")
        return EXIT_NO_WORKERS
    if options.pids_file:
        write_pids(options.pids_file, [(number, info) for number, _, info in started])
    lost_errors = (ray.exceptions.RayError,)
    lanes: list[Lane] = []
    with ThreadPoolExecutor(max_workers=min(32, len(started)), thread_name_prefix="outputs") as executor:
        try:
            for number, actor, _ in started:
                connection = await Connection.open(options.channel)
                lanes.append(
                    Lane(
                        number, actor, connection, options, executor, lost_errors, ray.exceptions.RayTaskError
                    )
                )
        except ChannelClosed as exc:
            say(str(exc))
            for lane in lanes:
                lane.connection.close()
            return EXIT_CHANNEL_CLOSED
        outcomes = await asyncio.gather(*(lane.run() for lane in lanes))
    await _close_actors([lane.actor for lane in lanes if lane.outcome == "done"])
    reported = sum(lane.reported for lane in lanes)
    failed = sum(lane.failed for lane in lanes)
    say(f"{reported} range(s) reported ({failed} failed); actors: {', '.join(outcomes)}")
    if "closed" in outcomes:
        return EXIT_CHANNEL_CLOSED
    if "done" not in outcomes:
        say("every ray worker was lost")
        return EXIT_NO_WORKERS
    return EXIT_OK


async def run_until_signal(ray: Any, options: Options) -> int:
    """``drive``, cancelled by SIGTERM or SIGINT (then 128 + the signal)."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(drive(ray, options))
    signalled: list[int] = []

    def on_signal(signum: int) -> None:
        if not signalled:
            say(f"signal {signum}: stopping, nothing more is reported")
            signalled.append(signum)
            task.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        return await task
    except asyncio.CancelledError:
        if not signalled:
            raise
        return 128 + signalled[0]
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)  # which restores the default action: not ours
            signal.signal(signum, _raise_signalled)


class _Signalled(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_signalled(signum: int, frame: object) -> None:
    raise _Signalled(signum)


def connect(options: Options) -> Any:
    """Ray, initialised: a local instance (``--local``) or the cluster at ``--address``."""
    import ray

    common: dict[str, Any] = {
        "log_to_driver": False,  # the actors' own logs stay in Ray's session directory
        "logging_level": "WARNING",
        "include_dashboard": False,
    }
    if options.node_ip_address:
        common["_node_ip_address"] = options.node_ip_address
    if options.temp_dir:
        common["_temp_dir"] = options.temp_dir
    if options.local_cpus is not None:
        ray.init(num_cpus=options.local_cpus, **common)
    else:
        ray.init(address=options.address, **common)
    return ray


def run(options: Options) -> int:
    """Connect to Ray, drive the job, shut Ray down: the exit status."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a payload does not phone home
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _raise_signalled)
    ray: Any = None
    try:
        try:
            ray = connect(options)  # Ray's own handler then makes SIGTERM a SystemExit(15)
        except SystemExit as exc:
            if exc.code == signal.SIGTERM:
                return 128 + signal.SIGTERM
            raise
        except (ConnectionError, RuntimeError, ValueError) as exc:
            say(f"cannot start or reach Ray: {exc}")
            return EXIT_NO_WORKERS
        signal.signal(signal.SIGTERM, _raise_signalled)  # Ray's handler again: ours until the loop runs
        return asyncio.run(run_until_signal(ray, options))
    except _Signalled as exc:
        return 128 + exc.signum
    finally:
        # stopping already: a second signal must not cut the shutdown short
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
        if ray is not None and ray.is_initialized():
            ray.shutdown()


def parse_options(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m pilot.hpc.raydriver", description="An event-service payload on Ray actors."
    )
    parser.add_argument("--channel", default=os.environ.get("PILOT_EVENTRANGECHANNEL"))
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or "auto")
    parser.add_argument("--local", type=int, default=None, metavar="N", help="start a local Ray with N CPUs")
    parser.add_argument("--workers", type=int, default=None, help="actors (default: the alive nodes' CPUs)")
    parser.add_argument("--output-dir", default=".")
    parser.add_argument("--output-bytes", type=int, default=256)
    parser.add_argument("--event-seconds", type=float, default=0.0)
    parser.add_argument("--command", default=None, help="shell command template per range")
    parser.add_argument("--pids-file", default=None, help="write each started actor's pid here")
    parser.add_argument(
        "--temp-dir",
        default=None,
        help="Ray's temporary directory: the local Ray's (--local), or where `ray start` put the"
        " cluster this node belongs to (for --address auto; the pilot sets the payload's TMPDIR)",
    )
    parser.add_argument("--node-ip-address", default=None, help="this node's address for Ray")
    parser.add_argument("--start-timeout", type=float, default=60.0, help="seconds for an actor to start")
    args = parser.parse_args(argv)
    if not args.channel:
        parser.error("no channel: give --channel or set PILOT_EVENTRANGECHANNEL")
    if args.local is not None and args.local < 0:
        parser.error("--local must be at least 0 (0: a node that runs no actor)")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.output_bytes < 0 or not args.event_seconds >= 0 or not args.start_timeout > 0:
        parser.error("--output-bytes and --event-seconds must be >= 0, --start-timeout > 0")
    return Options(
        channel=args.channel,
        address=args.address,
        local_cpus=args.local,
        workers=args.workers,
        output_dir=os.path.abspath(args.output_dir),
        output_bytes=args.output_bytes,
        event_seconds=args.event_seconds,
        command=args.command,
        pids_file=args.pids_file,
        temp_dir=args.temp_dir,
        node_ip_address=args.node_ip_address,
        start_timeout=args.start_timeout,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_options(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
