"""What every copytool gets (``ToolContext``) and how process-based tools run commands."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import Any

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorProcess, IReactorTime

from pilot.container.spec import Launch
from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError
from pilot.process.runner import OS_PROCESS_CONTROL, ManagedProcess, ProcessControl, ProcessStartError
from pilot.staging.credentials import Credentials
from pilot.staging.errors import classify
from pilot.staging.transfer import CopyRequest, TransferError
from pilot.util.records import record
from pilot.util.threads import ThreadRunner

#: Wraps a copytool command (argv, environment) for the stage-in/out container, if any.
CommandWrapper = Callable[[Sequence[str], Mapping[str, str]], Launch]


@record
class ToolContext:
    """Everything a copytool may use; built once per job by the staging engine."""

    spawner: IReactorProcess
    clock: IReactorTime
    in_thread: ThreadRunner
    env: Mapping[str, str]
    logdir: Path
    http: HTTPClient | None = None
    credentials: Credentials = field(default_factory=lambda: Credentials({}))
    control: ProcessControl = OS_PROCESS_CONTROL
    setup: Mapping[str, Any] = field(default_factory=dict)
    #: Per direction, the container wrapper of copytool commands (queue ``container_type``
    #: roles ``stagein``/``stageout``); None: commands run on the host.
    wrap_in: CommandWrapper | None = None
    wrap_out: CommandWrapper | None = None
    #: Told of every copytool process started (pid, tool, lfn) and ended (pid): the job's
    #: journal, so that a successor of a pilot that dies can stop what it left running.
    on_started: Callable[[int, str, str], None] | None = None
    on_ended: Callable[[int], None] | None = None
    _serial: list[int] = field(default_factory=lambda: [0])

    def next_log(self, tool: str, lfn: str) -> Path:
        self._serial[0] += 1
        self.logdir.mkdir(parents=True, exist_ok=True)
        return self.logdir / f"{self._serial[0]:04d}-{tool}-{lfn[:80]}.log"


def find_executable(name: str, env: Mapping[str, str], code: ErrorCode) -> str:
    """The absolute path of ``name`` on the tool environment's PATH, or a TransferError."""
    found = shutil.which(name, path=env.get("PATH"))
    if found is None:
        raise TransferError(code, f"{name} is not installed (not on PATH)", retry_elsewhere=False)
    return found


@record(frozen=True)
class CommandOutput:
    exit_code: int | None
    signal: int | None
    output: str


async def run_command(
    context: ToolContext,
    argv: Sequence[str],
    request: CopyRequest,
    *,
    tool: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> CommandOutput:
    """Run a copytool command (argument vector, never a shell) and capture its output.

    The command gets its own process group and a combined output file in the
    staging log directory; cancelling the returned coroutine's Deferred (which the
    engine does on a time-out) kills the whole group.
    """
    log = context.next_log(tool, request.lfn)
    environ = env if env is not None else context.env
    wrapper = context.wrap_in if request.stage_in else context.wrap_out
    shield = 0
    if wrapper is not None:
        try:
            # in a thread: it stats the paths the command names, which may be on a slow mount
            launch = await context.in_thread(wrapper, argv, environ)
        except PilotError as exc:
            raise TransferError(exc.code, exc.detail, retry_elsewhere=False) from None
        argv, environ, shield = launch.argv, launch.env, launch.shield_levels
    process = ManagedProcess(
        context.spawner,
        context.clock,
        argv,
        env=environ,
        cwd=cwd or context.logdir,
        stdout=log,
        stderr=log,
        kill_grace=5.0,
        name=f"{tool} {request.lfn}",
        control=context.control,
        soft_stop_depth=shield,
        in_thread=context.in_thread,
    )
    try:
        process.start()
    except ProcessStartError as exc:
        raise TransferError(
            ErrorCode.STAGEINFAILED if request.stage_in else ErrorCode.STAGEOUTFAILED, str(exc)
        ) from None
    if context.on_started is not None and process.pid is not None:
        context.on_started(process.pid, tool, request.lfn)
    try:
        outcome = await process.wait()
    except CancelledError:
        await process.terminate("transfer cancelled")
        raise
    finally:
        if context.on_ended is not None and process.pid is not None:
            context.on_ended(process.pid)
    output = await context.in_thread(_read_tail, log)
    return CommandOutput(outcome.exit_code, outcome.signal, output)


def _read_tail(path: Path, limit: int = 16384) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - limit))
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


async def run_copy(
    context: ToolContext,
    argv: Sequence[str],
    request: CopyRequest,
    *,
    tool: str,
    env: Mapping[str, str] | None = None,
) -> CommandOutput:
    """``run_command`` for a copy that must succeed: a non-zero exit is a classified TransferError."""
    output = await run_command(context, argv, request, tool=tool, env=env)
    if output.exit_code != 0:
        raise failed(output, request, tool)
    return output


def failed(output: CommandOutput, request: CopyRequest, tool: str) -> TransferError:
    """The TransferError for a command that did not exit 0."""
    what = f"exit {output.exit_code}" if output.signal is None else f"signal {output.signal}"
    error = classify(output.output or f"{tool} failed ({what})", stage_in=request.stage_in)
    error.detail = f"{tool} {what}: {error.detail}"
    return error
