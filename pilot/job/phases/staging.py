"""Stage-in before the payload, stage-out of its outputs after it."""

from __future__ import annotations

from pilot.job.context import JobContext
from pilot.job.outputs import describe_outputs
from pilot.job.states import JobPhase


class StageInPhase:
    """Inputs to the work directory (or into the file catalogue, for direct access)."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx

    async def run(self) -> None:
        ctx = self.ctx
        ctx.advance(JobPhase.STAGEIN)
        assert ctx.staging is not None  # made by the setup phase
        await ctx.control.guard(ctx.staging.stage_in())


class StageOutPhase:
    """Outputs measured (size, adler32) and stored where the queue says."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx

    async def run(self) -> None:
        ctx = self.ctx
        assert ctx.workdir is not None and ctx.staging is not None
        ctx.advance(JobPhase.STAGEOUT)
        if ctx.job.flag("eventService") and not ctx.job.flag("eventServiceMerge"):
            # an event-service job's outputs went to the object store range by range, in
            # archives (``pilot.job.phases.events``); the job's own output files are made
            # later by the merge job
            ctx.reported = []
            return
        described = await ctx.control.guard(
            describe_outputs(
                ctx.job, ctx.workdir, ctx.env.in_thread, max_size=ctx.env.config.monitor.max_output_size
            )
        )
        ctx.reported = await ctx.control.guard(ctx.staging.stage_out(described))
