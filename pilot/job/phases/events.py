"""An event-service job's payload: run once, fed event ranges over a Unix socket until the end.

The pilot listens on a socket in a short private directory (``sun_path`` holds 107
bytes, which a job directory often exceeds), exports its path as
``PILOT_EVENTRANGECHANNEL`` and writes it where that word stands in the job's
parameters.  The first ranges are fetched before the payload starts (no ranges:
ESNOEVENTS, and no payload).  The payload then runs as any payload does (monitors,
co-process, utilities, the pilot's abort), and however it ends, ``EventService.finish``
fails the ranges it did not finish, stores and reports the rest by a deadline that
leaves room for the job's final update.

A softkill (from a heartbeat's or a range report's reply) stops handing out ranges:
the workers get "No more events", finish what they hold, and the payload ends by
itself.  A server kill or a signal aborts the job as usual; a payload that finishes
its range in hand on SIGTERM still gets that range stored and reported.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import cast

from twisted.internet.interfaces import IReactorUNIX
from twisted.logger import Logger

from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError
from pilot.eventservice.batches import StoredArchive
from pilot.eventservice.channel import UNIX_PATH_MAX, RangeChannel
from pilot.eventservice.engine import EventJob, EventService, EventServiceSettings
from pilot.job.context import JobContext
from pilot.job.phases.payload import PayloadRun
from pilot.logs import pilot_observer
from pilot.server.messages import StatusCode, UpdateResult

log = Logger(observer=pilot_observer)

#: The word replaced by the channel's path in the payload's command, and the variable name.
CHANNEL_WORD = "PILOT_EVENTRANGECHANNEL"
#: The word where it is not a shell variable reference (``$X``/``${X}`` stay variables).
_CHANNEL_WORD = re.compile(r"(?<![$\w{])PILOT_EVENTRANGECHANNEL(?!\w)")
#: Directories whose names can go into a command unquoted.
_PLAIN_PATH = re.compile(r"^[A-Za-z0-9_./-]+$")
#: The queue's ``zip_time_gap`` when it has none (seconds).
DEFAULT_ZIP_TIME_GAP = 600.0
#: Of the time left to the final deadline, what the last archives and reports may use.
DRAIN_SHARE = 0.6


def is_event_service(ctx: JobContext) -> bool:
    return ctx.job.flag("eventService") and not ctx.job.flag("eventServiceMerge")


def channel_directory() -> Path:
    """A new private (0700) directory with a short, shell-safe path for the socket."""
    base = os.environ.get("TMPDIR", "")
    if not base or not _PLAIN_PATH.match(base) or len(base) > 60 or not os.path.isdir(base):
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix="txpilot-es-", dir=base))


def with_channel(command: str, path: str) -> str:
    """``command`` with the channel's path where the bare word ``PILOT_EVENTRANGECHANNEL`` stands."""
    return _CHANNEL_WORD.sub(path, command)


def settings_for(ctx: JobContext) -> EventServiceSettings:
    options = ctx.env.config.event_service
    gap = ctx.env.queuedata.raw.get("zip_time_gap")
    zip_time_gap = (
        float(gap) if isinstance(gap, int | float) and not isinstance(gap, bool) and gap > 0 else None
    )
    return EventServiceSettings(
        ranges_per_request=options.ranges_per_request,
        min_fetch=max(options.min_fetch, 2 * ctx.job.core_count),
        max_fetch=options.max_fetch,
        batch_ranges=options.batch_ranges,
        zip_time_gap=options.zip_time_gap or zip_time_gap or DEFAULT_ZIP_TIME_GAP,
    )


def event_service_for(
    ctx: JobContext,
    settings: EventServiceSettings,
    kind: str,
    *,
    on_command: Callable[[str], None] = lambda command: None,
) -> EventService:
    """The job's ``EventService``: ranges from the pilot's event source, archives stored by the job."""
    env, job, staging = ctx.env, ctx.job, ctx.staging
    assert ctx.workdir is not None and staging is not None  # made by the setup phase
    source = env.event_source
    if source is None:
        raise PilotError(ErrorCode.ESFATAL, f"this pilot's job source cannot serve an {kind} job")
    if job.jobset_id is None:
        raise PilotError(ErrorCode.ESFATAL, f"an {kind} job without a jobsetID")

    async def store(path: Path, lfn: str, size: int, adler32: str) -> StoredArchive:
        url, objstore_id = await staging.store_archive(path, lfn, size, adler32)
        return StoredArchive(url, objstore_id)

    return EventService(
        env.clock,
        env.in_thread,
        ctx.workdir,
        source,
        store,
        EventJob(job.panda_id, job.jobset_id, job.task_id, job.core_count),
        settings,
        on_command=on_command,
    )


def drain_deadline(ctx: JobContext) -> float:
    """When the last archives and reports must be done: leaves room for the final update."""
    now = ctx.env.clock.seconds()
    return now + max(0.0, (ctx.deadline() - now) * DRAIN_SHARE)


class EventServicePayload(PayloadRun):
    """A ``PayloadRun`` fed event ranges (see the module docstring)."""

    async def run(self) -> None:
        ctx, env = self.ctx, self.ctx.env
        service = event_service_for(ctx, settings_for(ctx), "event-service", on_command=self._command)
        directory = await env.in_thread(channel_directory)
        path = directory / "ranges"
        channel = RangeChannel(cast(IReactorUNIX, env.spawner), path, service)
        ctx.softkill_hooks.append(lambda: service.stop_handing_out("the server sent softkill"))
        try:
            if len(os.fsencode(path)) >= UNIX_PATH_MAX:
                raise PilotError(ErrorCode.ESFATAL, f"channel path too long for a Unix socket: {path}")
            await channel.listen()
            try:
                await ctx.control.guard(service.start())
                self.environ = {**self.environ, CHANNEL_WORD: str(path)}
                self.command = with_channel(self.command, str(path))
                await super().run()
            finally:
                await self._finish(service)
        finally:
            await channel.close()
            await env.in_thread(shutil.rmtree, directory, True)
            ctx.summary.event_service = service.summary()
        error = service.supply.error
        if error is not None:
            raise error
        if service.reporter.reported_finished == 0 and service.finished_payload == 0:
            raise PilotError(ErrorCode.ESNOEVENTS, "the payload finished no event range")

    async def _finish(self, service: EventService) -> None:
        ctx = self.ctx
        reason = "the job was aborted" if ctx.control.aborted else "the payload ended"
        await service.finish(drain_deadline(ctx), reason)
        ctx.n_events = service.events_stored

    def _command(self, command: str) -> None:
        """A command in a range report's reply: handled as a heartbeat's reply would be."""
        self.ctx.on_commands(UpdateResult(StatusCode.SUCCESS, commands=(command,)))
