"""Setup: the job's work directory, the checks before anything is staged, the ``starting``
update, the heartbeat, and the transformation when it must be downloaded."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFDSet
from twisted.logger import Logger

from pilot.config import CgroupMode
from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError
from pilot.job.context import JobContext, JobEnvironment
from pilot.job.heartbeat import Heartbeat
from pilot.job.launcher import ProcessLauncher, cgroup_limits
from pilot.job.staging import JobStaging
from pilot.job.states import JobPhase
from pilot.job.transformation import download_sources, fetch_transformation
from pilot.logs import pilot_observer
from pilot.process.jobscope import JobScope

log = Logger(observer=pilot_observer)


def make_workdir(pilot_dir: Path, panda_id: int, mode: int = 0o700) -> Path:
    """``PanDA_Pilot-<PandaID>`` under the pilot's directory, empty, with its ``tmp``.

    ``mode``: the pilot user's alone by default (``--file-mode``); ``chmod`` after
    ``mkdir``, so that the process umask cannot widen or narrow it.
    """
    workdir = pilot_dir / f"PanDA_Pilot-{panda_id}"
    try:
        if workdir.exists():
            shutil.rmtree(workdir)
        workdir.mkdir(mode=mode)
        workdir.chmod(mode)
        (workdir / "tmp").mkdir()
    except OSError as exc:
        code = ErrorCode.NOLOCALSPACE if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ErrorCode.MKDIR
        raise PilotError(code, f"{workdir}: {exc.strerror}") from None
    return workdir


class SetupPhase:
    """See the module docstring."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx

    async def run(self) -> None:
        ctx, env, job = self.ctx, self.ctx.env, self.ctx.job
        state = ctx.advance(JobPhase.SETUP)
        ctx.control.check()
        workdir = await env.in_thread(make_workdir, env.pilot_dir, job.panda_id, env.config.modes.directory)
        ctx.workdir = workdir
        ctx.summary.workdir = str(workdir)
        if ctx.journal is not None:
            await ctx.journal.workdir(workdir)
        await self._check_free_space(workdir)
        problem = await env.in_thread(env.experiment.verify_setup, job, workdir)
        if problem:
            raise PilotError(ErrorCode.SETUPFAILURE, problem)
        attach_tools(ctx, workdir)
        assert ctx.launcher is not None and ctx.launcher.scope is not None
        await ctx.launcher.scope.open()  # the job's cgroup, before any of its processes starts
        if ctx.journal is not None:  # before any of them starts: a successor sweeps by it
            await ctx.journal.scope(ctx.launcher.scope.marker)
        if state is not None:
            ctx.control.check()
            await ctx.send(state)
        start_heartbeat(ctx)
        sources = download_sources(job, env.config.baseurls, allow_http=env.config.allow_http_transformations)
        if sources:
            path = await ctx.control.guard(
                fetch_transformation(
                    sources, workdir, env.fetch_file, env.in_thread, mode=env.config.modes.executable
                )
            )
            ctx.transformation = f"./{path.name}"

    async def _check_free_space(self, workdir: Path) -> None:
        """A job needs ``min_free_start`` bytes free before it starts (2 GB by default)."""
        env = self.ctx.env
        needed = env.config.monitor.min_free_start
        try:
            free = (await env.in_thread(shutil.disk_usage, workdir)).free
        except OSError:
            return
        if free < needed:
            raise PilotError(
                ErrorCode.NOLOCALSPACE,
                f"{free / 1e9:.2f} GB free for the job, {needed / 1e9:.2f} GB needed before it starts",
            )


def attach_tools(ctx: JobContext, workdir: Path, *, marker: str | None = None) -> None:
    """The job's process launcher and staging, for ``workdir`` (a new job's, or a resumed one's).

    ``marker``: the job's process marker, when a successor resumes a dead pilot's job.
    """
    env, job = ctx.env, ctx.job
    ctx.workdir = workdir
    ctx.summary.workdir = str(workdir)
    ctx.launcher = _launcher(ctx, workdir, marker)
    ctx.staging = JobStaging(
        job,
        workdir,
        env.staging,
        env.queuedata,
        spawner=env.spawner,
        clock=env.clock,
        in_thread=env.in_thread,
        control=env.process_control,
        catalog_name=env.experiment.file_catalog_name(job),
        wrap_in=ctx.launcher.copytool_wrapper("stagein"),
        wrap_out=ctx.launcher.copytool_wrapper("stageout"),
    )
    journal = ctx.journal
    if journal is not None:

        def started(pid: int, tool: str, lfn: str) -> None:
            Deferred.fromCoroutine(journal.copytool_started(pid, tool, lfn))  # logs its own failures

        def ended(pid: int) -> None:
            journal.copytool_ended(pid)

        ctx.staging.tool_started, ctx.staging.tool_ended = started, ended
        ctx.staging.transfer_done = journal.transfer_done


def start_heartbeat(ctx: JobContext) -> None:
    env = ctx.env
    ctx.heartbeat = Heartbeat(
        env.clock,
        env.config.heartbeat_period,
        env.config.debug_heartbeat_period,
        ctx.beat,
        debug=ctx.job.is_debug,
    )
    ctx.heartbeat.start()


def _fdset(env: JobEnvironment) -> IReactorFDSet | None:
    """The reactor's file-descriptor side, for waiting on cgroup events and pidfds (None: a fake)."""
    for candidate in (env.clock, env.spawner):
        if IReactorFDSet.providedBy(candidate):
            return cast(IReactorFDSet, candidate)
    return None


def _scope(ctx: JobContext, marker: str | None) -> JobScope:
    env, job = ctx.env, ctx.job
    return JobScope(
        marker=marker,
        panda_id=job.panda_id,
        attempt=job.attempt_nr,
        spawner=env.spawner,
        clock=env.clock,
        in_thread=env.in_thread,
        fdset=_fdset(env),
        kill_grace=env.config.kill_grace,
        use_cgroups=env.config.cgroups is CgroupMode.AUTO,
        limits=cgroup_limits(job, env.queuedata),
    )


def _launcher(ctx: JobContext, workdir: Path, marker: str | None) -> ProcessLauncher:
    env = ctx.env
    credentials = env.config.credentials
    # the pilot's directory (its logs, other jobs) and its own credentials
    hidden = [env.pilot_dir, *(p for p in (credentials.proxy, credentials.token_file) if p)]
    return ProcessLauncher(
        spawner=env.spawner,
        clock=env.clock,
        job=ctx.job,
        workdir=workdir,
        experiment=env.experiment,
        queuedata=env.queuedata,
        pilot_environ=env.pilot_environ,
        hidden=hidden,
        kill_grace=env.config.kill_grace,
        control=env.process_control,
        gate=ctx.control.check,
        in_thread=env.in_thread,
        output_mode=env.config.modes.file,
        scope=_scope(ctx, marker),
    )
