"""Hyper-parameter optimisation jobs: pre-process → payload → post-process, once per point.

An HPO job (``isHPO``) evaluates hyper-parameter points that the server hands out as
event ranges.  Each pass of the loop runs the pre-process (an exit of 160-162 ends the
loop: no more points or the loop's limit), takes one point, writes it where the
payload finds it (``PILOT_HPO_POINT``, a JSON file holding the range as the server sent
it), runs the payload, which writes its result to ``PILOT_HPO_RESULT``, and runs the
post-process.  The result file is the point's output: it is archived, stored and the
point reported finished exactly as an event-service range is (``pilot.eventservice``);
a payload that fails, or leaves no result, fails its point and the job.  The loop
also ends when the server has no more points.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError
from pilot.eventservice.channel import Ranges
from pilot.eventservice.engine import EventService, EventServiceSettings
from pilot.eventservice.messages import RangeDone, RangeFailed
from pilot.job.context import JobContext
from pilot.job.phases.events import drain_deadline, event_service_for
from pilot.logs import pilot_observer
from pilot.util.files import write_text_atomically

log = Logger(observer=pilot_observer)

POINT_FILE = "hpo_point.json"
RESULT_FILE = "hpo_result.json"
#: The channel name the points are booked under (one "worker": the payload of this pass).
WORKER = "hpo"

#: Runs the pre-process; False when it ends the loop (exit 160-162).
PreProcess = Callable[[], Awaitable[bool]]
#: Runs the payload with extra environment variables; raises PilotError when it fails.
RunPayload = Callable[[Mapping[str, str]], Awaitable[None]]
#: Runs the post-process (raises PilotError when it fails and the failure counts).
PostProcess = Callable[[], Awaitable[None]]

#: One point at a time: a point fetched ahead would be lost work if the loop ends.
HPO_SETTINGS = EventServiceSettings(
    ranges_per_request=1, min_fetch=1, max_fetch=1, batch_ranges=1, fetches_in_flight=1, prefetch=False
)


def is_hpo(ctx: JobContext) -> bool:
    return ctx.job.flag("isHPO")


class HpoLoop:
    """See the module docstring."""

    def __init__(
        self,
        ctx: JobContext,
        preprocess: PreProcess | None,
        run_payload: RunPayload,
        postprocess: PostProcess | None,
    ) -> None:
        self.ctx = ctx
        self.preprocess = preprocess
        self.run_payload = run_payload
        self.postprocess = postprocess
        self.points = 0

    async def run(self) -> None:
        ctx = self.ctx
        assert ctx.workdir is not None
        workdir = ctx.workdir
        service = event_service_for(ctx, HPO_SETTINGS, "HPO")
        try:
            await self._loop(service, workdir)
        finally:
            await service.finish(
                drain_deadline(ctx), "the job was aborted" if ctx.control.aborted else "the HPO loop ended"
            )
            ctx.n_events = service.events_stored
            ctx.summary.event_service = {**service.summary(), "hpo_points": self.points}
        if service.supply.error is not None:
            raise service.supply.error

    async def _loop(self, service: EventService, workdir: Path) -> None:
        ctx = self.ctx
        while True:
            ctx.control.check()
            if self.preprocess is not None and not await self.preprocess():
                return
            point = await ctx.control.guard(_first(service.next_ranges(WORKER)))
            if point is None:
                log.info("job {pandaid}: no more HPO points", pandaid=ctx.job.panda_id, event="job.hpo_end")
                return
            range_id = str(point["eventRangeID"])  # checked when it arrived
            self.points += 1
            point_file, result_file = workdir / POINT_FILE, workdir / RESULT_FILE
            await ctx.env.in_thread(_prepare, point_file, result_file, point)
            log.info(
                "job {pandaid}: HPO point {n}: {range_id}",
                pandaid=ctx.job.panda_id,
                n=self.points,
                range_id=range_id,
                event="job.hpo_point",
            )
            started = ctx.env.clock.seconds()
            try:
                await self.run_payload(
                    {"PILOT_HPO_POINT": str(point_file), "PILOT_HPO_RESULT": str(result_file)}
                )
            except PilotError as exc:
                service.range_failed(WORKER, RangeFailed(range_id, "ERR_HPO_PAYLOAD", exc.diag))
                raise
            if not await ctx.env.in_thread(result_file.is_file):
                service.range_failed(WORKER, RangeFailed(range_id, "ERR_HPO_NO_RESULT", "no result file"))
                raise PilotError(ErrorCode.PAYLOADEXECUTIONFAILURE, f"HPO point {range_id}: no result file")
            # a result file per point, named after it, so each archive holds its own
            kept = workdir / f"hpo_result_{self.points}.json"
            await ctx.env.in_thread(result_file.replace, kept)
            wall = ctx.env.clock.seconds() - started
            service.range_done(WORKER, RangeDone(range_id, str(kept), 0.0, wall))
            if self.postprocess is not None:
                await self.postprocess()


async def _first(asking: Awaitable[Ranges | None]) -> Mapping[str, Any] | None:
    """The one point a request of this loop's "worker" got (the engine booked it), or None."""
    answer = await asking
    return answer[0] if answer else None


def _prepare(point_file: Path, result_file: Path, point: Mapping[str, Any]) -> None:
    """The point where the payload reads it, and no result left from the previous pass."""
    try:
        result_file.unlink()
    except FileNotFoundError:
        pass
    write_text_atomically(point_file, json.dumps(dict(point)), durable=False, mode=0o644)
