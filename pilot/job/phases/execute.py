"""Execute: the pre-process, the payload with its co-process and utilities, the post-process.

The semantics are PanDA's (``pilot.job.composition``): a pre-process exit of 160-162
ends an HPO loop without running the payload and without an error; any other failure
of a pre- or post-process fails the job with its own code.  Utilities start before,
with or after the payload.  Nothing starts once the job is aborted: every process
goes through the launcher's gate, and a step the pilot terminated ends the phase
with a cancellation, which the orchestrator reads as "aborted".  The job's secrets
file exists only while this phase runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError
from pilot.job.composition import HPO_LOOP_END, fetch_step, step_argv, step_failure
from pilot.job.context import JobContext
from pilot.job.credentials import remove_job_credentials, write_job_credentials
from pilot.job.launcher import ProcessLauncher
from pilot.job.phases.events import EventServicePayload, is_event_service
from pilot.job.phases.hpo import HpoLoop, is_hpo
from pilot.job.phases.payload import PayloadRun
from pilot.job.states import JobPhase
from pilot.logs import pilot_observer
from pilot.model.documents import Step
from pilot.model.processes import ProcessOutcome
from pilot.process.environment import payload_environment
from pilot.process.runner import ManagedProcess
from pilot.process.utility import Utility
from pilot.util.untrusted import transformation_source_allowed

log = Logger(observer=pilot_observer)


def _how(outcome: ProcessOutcome) -> str:
    return f"signal {outcome.signal}" if outcome.signal is not None else f"code {outcome.exit_code}"


class ExecutePhase:
    """See the module docstring."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx

    async def run(self) -> None:
        ctx, env, job = self.ctx, self.ctx.env, self.ctx.job
        assert ctx.workdir is not None and ctx.launcher is not None  # made by the setup phase
        workdir, launcher = ctx.workdir, ctx.launcher
        ctx.control.check()
        experiment = env.experiment
        steps = dict(job.steps)  # validated by parse_job
        for name, step in list(steps.items()):
            if step.is_url:
                refusal = transformation_source_allowed(
                    step.command, step.checksum, env.config.allow_http_transformations
                )
                if refusal is not None:
                    raise PilotError(step_failure(name), f"{name} {step.command}: {refusal}")
                steps[name], _digest = await ctx.control.guard(
                    fetch_step(step, workdir, env.download, env.in_thread, mode=env.config.modes.executable)
                )
        command = experiment.payload_command(job, ctx.transformation, workdir)
        base_env = payload_environment(job, workdir, env.pilot_environ, env.queuedata.environ)
        environ = experiment.payload_environment(job, workdir, base_env)
        staging = ctx.staging
        if staging is not None and staging.catalog is not None:
            environ.update(experiment.input_environment(job, staging.catalog, staging.turls))
        ctx.control.check()
        environ.update(await env.in_thread(write_job_credentials, job, workdir))
        utilities = [
            Utility(
                spec=spec,
                start_process=self._utility_starter(launcher, spec.name, environ),
                clock=env.clock,
                record=ctx.record(spec.name, "utility"),
            )
            for spec in experiment.utilities(job, env.queuedata, workdir)
        ]
        try:
            for utility in utilities:
                if utility.spec.when == "before":
                    utility.start()
            if is_hpo(ctx):
                await self._hpo_loop(launcher, steps, command, environ)
                return
            if "preprocess" in steps and not await self._preprocess(launcher, steps["preprocess"], environ):
                return
            runner = EventServicePayload if is_event_service(ctx) else PayloadRun
            payload = runner(ctx, launcher, command, environ, steps.get("coprocess"), utilities)
            await payload.run()
            if "postprocess" in steps:
                await self._postprocess(launcher, steps["postprocess"], environ)
            for utility in utilities:
                if utility.spec.when == "after":
                    ctx.control.check()
                    utility.start()
                    if utility.process is not None:
                        ctx.control.track(utility.process)
                        await utility.process.wait()
        finally:
            for utility in utilities:
                await utility.stop()
            await env.in_thread(remove_job_credentials, workdir)

    async def _hpo_loop(
        self, launcher: ProcessLauncher, steps: Mapping[str, Step], command: str, environ: Mapping[str, str]
    ) -> None:
        """An HPO job's passes (``pilot.job.phases.hpo``); ``with`` utilities do not run in them."""
        ctx = self.ctx
        pre, post = steps.get("preprocess"), steps.get("postprocess")

        async def preprocess() -> bool:
            assert pre is not None
            return await self._preprocess(launcher, pre, environ)

        async def run_payload(extra: Mapping[str, str]) -> None:
            payload = PayloadRun(ctx, launcher, command, {**environ, **extra}, steps.get("coprocess"), [])
            await payload.run()

        async def postprocess() -> None:
            assert post is not None
            await self._postprocess(launcher, post, environ)

        await HpoLoop(
            ctx,
            preprocess if pre is not None else None,
            run_payload,
            postprocess if post is not None else None,
        ).run()

    def _utility_starter(
        self, launcher: ProcessLauncher, name: str, environ: Mapping[str, str]
    ) -> Callable[[list[str]], ManagedProcess]:
        def start(argv: list[str]) -> ManagedProcess:
            return launcher.start("utility", name, argv, environ, failure=ErrorCode.PAYLOADEXECUTIONFAILURE)

        return start

    async def _run_step(
        self, launcher: ProcessLauncher, step: Step, environ: Mapping[str, str], failure: ErrorCode
    ) -> ProcessOutcome:
        ctx = self.ctx
        record = ctx.record(step.name, step.name)
        process = launcher.start(step.name, step.name, step_argv(step), environ, failure=failure)
        ctx.control.track(process)
        record.runtime = launcher.runtimes_used.get(step.name)
        outcome = await process.wait()
        record.finish(outcome)
        log.info(
            "job {pandaid}: {step} ended: exit {exit_code}, signal {signal}",
            pandaid=ctx.job.panda_id, step=step.name, exit_code=outcome.exit_code,
            signal=outcome.signal, event="job.step_end",
        )  # fmt: skip
        if outcome.terminated_by_pilot:
            raise CancelledError()
        return outcome

    async def _preprocess(self, launcher: ProcessLauncher, step: Step, environ: Mapping[str, str]) -> bool:
        """Run the pre-process; False when it ends an HPO loop (no payload, no error)."""
        outcome = await self._run_step(launcher, step, environ, ErrorCode.PREPROCESSFAILURE)
        if outcome.exit_code in HPO_LOOP_END:
            if self.ctx.lifecycle.phase is not JobPhase.RUNNING:
                self.ctx.advance(JobPhase.RUNNING)  # the job ran (its pre-process), nothing failed
            log.info(
                "job {pandaid}: pre-process exit {code}: end of the HPO loop, no payload run",
                pandaid=self.ctx.job.panda_id, code=outcome.exit_code, event="job.hpo_end",
            )  # fmt: skip
            return False
        if outcome.signal is not None or outcome.exit_code != 0:
            raise PilotError(
                ErrorCode.PREPROCESSFAILURE, f"pre-process {step.command} failed with {_how(outcome)}"
            )
        return True

    async def _postprocess(self, launcher: ProcessLauncher, step: Step, environ: Mapping[str, str]) -> None:
        outcome = await self._run_step(launcher, step, environ, ErrorCode.POSTPROCESSFAILURE)
        if outcome.signal is None and outcome.exit_code == 0:
            return
        if step.ignore_failure:
            log.warn(
                "job {pandaid}: post-process failed with {how} (ignored)",
                pandaid=self.ctx.job.panda_id,
                how=_how(outcome),
            )
            return
        raise PilotError(
            ErrorCode.POSTPROCESSFAILURE, f"post-process {step.command} failed with {_how(outcome)}"
        )
