"""A running job's conversation with the server: heartbeats out, commands in, status on disk.

The heartbeat reports the job's state with what the monitors know (CPU, memory, the
debug tail in debug mode).  The server's answer may carry commands: ``tobekilled``
(PANDAKILL, the log tarball is kept), ``alreadydone`` (FAILEDBYSERVER), ``softkill``
(no further job for this pilot), ``debug``/``debugoff`` (the debug period and tail).
Every phase change and heartbeat also refreshes the job's section of the pilot's
status file.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from twisted.logger import Logger

from pilot.errorcodes import ErrorCode
from pilot.job.context import JobContext
from pilot.job.summary import utc_text
from pilot.logs import pilot_observer
from pilot.monitor.watcher import monitor_update_fields, newest_file_tail
from pilot.process.usage import tree_usage
from pilot.server.client import JobUpdate, UpdateResult

log = Logger(observer=pilot_observer)


class JobBeats:
    """Heartbeat body, command handling and status publishing for one job."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        ctx.on_commands = self.handle_commands
        ctx.on_change = self.publish_status
        ctx.beat = self.beat

    async def beat(self) -> None:
        ctx = self.ctx
        state = ctx.lifecycle.heartbeat_state
        if state is None or ctx.updates.busy:
            return
        extra: dict[str, Any] = {}
        process, monitor = ctx.payload, ctx.monitor
        if process is not None and process.running and process.pid is not None:
            if monitor is not None and monitor.last_sample is not None:
                extra.update(monitor_update_fields(monitor.current_fields()))
                last = monitor.last_sample
                extra["cpu_consumption_time"] = int(last.utime + last.stime)
            else:
                usage = await ctx.env.in_thread(tree_usage, process.pid)
                ctx.max_rss_kb = max(ctx.max_rss_kb, usage.rss_kb)
                extra["cpu_consumption_time"] = int(usage.cpu_seconds)
                extra["max_rss"] = ctx.max_rss_kb or None
            extra["cpu_consumption_unit"] = "s"
        heartbeat = ctx.heartbeat
        if heartbeat is not None and heartbeat.debug and ctx.workdir is not None:
            extra["stdout"] = await self.debug_tail()
        fields = JobUpdate(job_id=ctx.job.panda_id, state=state.value, core_count=ctx.job.core_count, **extra)
        self.publish_status()
        await ctx.send(state, fields)

    async def debug_tail(self) -> str:
        """What the operator sees of the job in debug mode: the newest file's end, redacted."""
        ctx = self.ctx
        assert ctx.workdir is not None
        if ctx.monitor is not None:
            return await ctx.monitor.debug_tail()
        settings = ctx.env.config.monitor
        return await ctx.env.in_thread(
            newest_file_tail, ctx.workdir, settings.debug_tail_bytes, secrets=ctx.env.secrets
        )

    def handle_commands(self, result: UpdateResult) -> None:
        ctx = self.ctx
        commands = set(result.commands)
        for command in result.commands:
            ctx.summary.note_command(command)
        if "tobekilled" in commands:
            ctx.abort(ErrorCode.PANDAKILL, "the server asked for the job to be killed", keep_log=True)
        elif "alreadydone" in commands:
            ctx.abort(ErrorCode.FAILEDBYSERVER, "the server has already ended this job", keep_log=False)
        if "softkill" in commands:
            ctx.env.on_softkill()
            for hook in ctx.softkill_hooks:
                hook()
        debug: bool | None = True if "debug" in commands else False if "debugoff" in commands else None
        if debug is not None:
            if ctx.heartbeat is not None:
                ctx.heartbeat.set_debug(debug)
            if ctx.monitor is not None:
                ctx.monitor.set_debug(debug)

    def publish_status(self) -> None:
        """Refresh the job's section of the pilot's status file (if there is one)."""
        ctx = self.ctx
        status = ctx.env.status
        if status is None:
            return
        section: dict[str, Any] = {
            "pandaid": ctx.job.panda_id,
            "phase": ctx.lifecycle.phase.value,
            "since": utc_text(ctx.env.clock.seconds()),
            "workdir": ctx.summary.workdir,
            "debug": bool(ctx.heartbeat and ctx.heartbeat.debug),
        }
        monitor = ctx.monitor
        if monitor is not None and monitor.last_sample is not None:
            section["usage"] = asdict(monitor.last_sample)
            section["idle_seconds"] = round(monitor.idle)
        if ctx.staging is not None and ctx.staging.metrics.transfers:
            section["last_transfer"] = ctx.staging.metrics.transfers[-1]
        first = ctx.errors.first
        if first is not None:
            section["error"] = {"code": int(first.code), "name": first.code.name, "diag": first.diag}
        status.update(job=section)
