"""Starting one of a job's processes, in its container if the queue says so.

Every process of a job (pre-process, payload, co-process, post-process, utilities)
goes through ``ProcessLauncher.start``: the experiment plug-in names the container
runtime for the process's role, the runtime turns the argument vector into its
launcher's (``bwrap ...``, ``apptainer exec ...``), and ``ManagedProcess`` runs that in
its own process group with the job's stdout/stderr files.  Nothing is ever spliced into
a pilot-side shell command.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IReactorProcess, IReactorTime

from pilot.container.interfaces import IContainerRuntime
from pilot.container.spec import SYSTEM_TREES, Bind, ContainerSpec, ImageError, Launch
from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError
from pilot.interfaces import IExperiment
from pilot.model.job import Job
from pilot.monitor.limits import memory_limit_kb
from pilot.process.jobscope import JobScope
from pilot.process.runner import OS_PROCESS_CONTROL, ManagedProcess, ProcessControl, ProcessStartError
from pilot.process.supervisor import supervised_argv
from pilot.queuedata import QueueData
from pilot.util.threads import ThreadRunner

if TYPE_CHECKING:
    from pilot.staging.tools.base import CommandWrapper


def _in_system_tree(path: Path) -> bool:
    return any(path == Path(tree) or Path(tree) in path.parents for tree in SYSTEM_TREES)


def binds_for(argv: Sequence[str], environ: Mapping[str, str], workdir: Path) -> list[Bind]:
    """The binds a command needs for the absolute paths it names outside the work directory."""
    binds: dict[Path, Bind] = {}
    candidates = [a for a in argv if a.startswith("/")]
    candidates += [v for v in environ.values() if v.startswith("/") and os.pathsep not in v]
    for text in candidates:
        path = Path(text)
        if path == workdir or workdir in path.parents or _in_system_tree(path):
            continue
        if path.is_file():
            # a client in a virtual environment needs the environment, not just its binary
            source = (
                path.parent.parent
                if path.parent.name == "bin" and (path.parent.parent / "pyvenv.cfg").exists()
                else path
            )
            binds.setdefault(source, Bind(source, source, read_only=True))
        elif path.is_dir():
            binds.setdefault(path, Bind(path, path, read_only=True))
        elif path.parent.is_dir():  # a destination still to be written
            binds[path.parent] = Bind(path.parent, path.parent, read_only=False)
    return list(binds.values())


#: ``memory.max`` of a job's cgroup, as a multiple of its memory limit: the monitor, which
#: fails the job with PAYLOADEXCEEDMAXMEM, acts first; the kernel only stops a runaway
#: allocation that would outrun the monitor's next sample.
CGROUP_MEMORY_FACTOR = 1.5


def cgroup_limits(job: Job, queuedata: QueueData) -> dict[str, str]:
    """The limits of ``job``'s cgroup: ``memory.max``, and ``pids.max`` when the queue sets
    ``pilot_pids_max`` (processes and threads of the job, in its ``params``)."""
    limits: dict[str, str] = {}
    memory_kb = memory_limit_kb(job, queuedata)
    if memory_kb:
        limits["memory.max"] = str(int(memory_kb * 1024 * CGROUP_MEMORY_FACTOR))
    pids = str(queuedata.params.get("pilot_pids_max", "")).strip()
    if pids.isdigit() and int(pids) > 0:
        limits["pids.max"] = pids
    return limits


def _runtimes() -> dict[str, IContainerRuntime]:
    from pilot.container.registry import runtimes  # imported on first container use only

    return runtimes()


class ProcessLauncher:
    """Builds and starts the processes of one job."""

    def __init__(
        self,
        *,
        spawner: IReactorProcess,
        clock: IReactorTime,
        job: Job,
        workdir: Path,
        experiment: IExperiment,
        queuedata: QueueData,
        pilot_environ: Mapping[str, str],
        hidden: Sequence[Path] = (),
        kill_grace: float = 10.0,
        control: ProcessControl = OS_PROCESS_CONTROL,
        gate: Callable[[], None] = lambda: None,
        in_thread: ThreadRunner | None = None,
        output_mode: int = 0o600,
        scope: JobScope | None = None,
    ) -> None:
        self.spawner = spawner
        self.clock = clock
        self.job = job
        self.workdir = workdir
        self.experiment = experiment
        self.queuedata = queuedata
        self.pilot_environ = pilot_environ
        self.hidden = tuple(hidden)
        self.kill_grace = kill_grace
        self.control = control
        #: Called before any process is built: raises once the job is aborted, so that
        #: nothing new starts after a signal or a kill.
        self.gate = gate
        self.in_thread = in_thread
        self.output_mode = output_mode
        #: The job's marker, cgroup and process groups (``pilot.process.jobscope``); None: none.
        self.scope = scope
        self.runtimes_used: dict[str, str] = {}  # role → runtime, for the job summary

    def wrap(
        self, role: str, argv: Sequence[str], environ: Mapping[str, str], *, binds: Sequence[Bind] = ()
    ) -> Launch | None:
        """``argv`` wrapped for its role's container runtime, or None when the role has none."""
        runtime_name = self.experiment.container_runtime(role, self.job, self.queuedata)
        if not runtime_name:
            return None
        runtime = _runtimes().get(runtime_name)
        if runtime is None or not runtime.available(self.pilot_environ):
            code = (
                ErrorCode.APPTAINERNOTINSTALLED
                if runtime_name == "apptainer"
                else ErrorCode.QUEUENOTSETUPFORCONTAINERS
            )
            raise PilotError(code, f"container runtime {runtime_name} for {role} is not installed")
        # Only image-based runtimes take an image; bubblewrap runs the host's system.
        image = (
            self.experiment.container_image(self.job, self.queuedata)
            if runtime_name != "bubblewrap"
            else None
        )
        if runtime_name == "apptainer" and image is None:
            raise PilotError(ErrorCode.IMAGENOTFOUND, f"no container image for the {role} (apptainer)")
        spec = ContainerSpec(
            role=role,
            argv=list(argv),
            env=dict(environ),
            workdir=self.workdir,
            image=image,
            options=self.queuedata.container_options,
            binds=tuple(binds),
            hidden=self.hidden,
        )
        try:
            launch = runtime.wrap(spec, self.pilot_environ)
        except FileNotFoundError as exc:
            raise PilotError(ErrorCode.QUEUENOTSETUPFORCONTAINERS, str(exc)) from None
        except ImageError as exc:
            raise PilotError(ErrorCode.IMAGENOTFOUND, str(exc)) from None
        except ValueError as exc:  # the runtime refuses the options or binds
            raise PilotError(ErrorCode.SINGULARITYGENERALFAILURE, str(exc)) from None
        self.runtimes_used[role] = runtime_name
        return launch

    def build(
        self,
        role: str,
        name: str,
        argv: Sequence[str],
        environ: Mapping[str, str],
        *,
        failure: ErrorCode,
        status_file: Path | None = None,
    ) -> ManagedProcess:
        """The ``ManagedProcess`` for ``argv`` in ``role`` (wrapped in a container if asked).

        ``status_file``: run it under the supervisor (``pilot.process.supervisor``), which
        records how it ended there even if the pilot is dead by then; the supervisor is the
        outermost process (outside any container), one level above what it runs.
        """
        self.gate()
        if self.scope is not None:
            environ = self.scope.environ(environ)  # inside a container too
        launch = self.wrap(role, argv, environ)
        if launch is None:
            launch = Launch(argv=list(argv), env=dict(environ))
        argv_out = list(launch.argv)
        shield = launch.shield_levels
        if status_file is not None:
            argv_out = supervised_argv(status_file, argv_out, env=launch.env)
            shield = shield + 1 if shield else 0
        env = launch.env
        if self.scope is not None:  # the outermost process carries the marker and joins the cgroup
            argv_out = self.scope.argv(argv_out)
            env = self.scope.environ(env)
        process = ManagedProcess(
            self.spawner,
            self.clock,
            argv_out,
            env=env,
            cwd=self.workdir,
            stdout=self.workdir / f"{name}.stdout",
            stderr=self.workdir / f"{name}.stderr",
            kill_grace=self.kill_grace,
            name=f"{name} of job {self.job.panda_id}",
            control=self.control,
            soft_stop_depth=shield,
            in_thread=self.in_thread,
            output_mode=self.output_mode,
        )
        if self.scope is not None:
            self.scope.adopt(process)
        return process

    def copytool_wrapper(self, role: str) -> CommandWrapper | None:
        """For copytools (``stagein``/``stageout`` roles): wraps each command, binding what it names.

        A copytool command names paths outside the work directory (a mounted storage area,
        the proxy, a client's virtual environment); they are bound into the container:
        existing files read-only, a destination that does not exist yet through its
        directory, read-write.  None when the role runs without a container.
        """
        if not self.experiment.container_runtime(role, self.job, self.queuedata):
            return None

        def wrap(argv: Sequence[str], environ: Mapping[str, str]) -> Launch:
            launch = self.wrap(role, argv, environ, binds=binds_for(argv, environ, self.workdir))
            assert launch is not None
            return launch

        return wrap

    def start(
        self, role: str, name: str, argv: Sequence[str], environ: Mapping[str, str], *, failure: ErrorCode
    ) -> ManagedProcess:
        """``build`` and start; a process that cannot start fails the job with ``failure``."""
        process = self.build(role, name, argv, environ, failure=failure)
        try:
            process.start()
        except ProcessStartError as exc:
            raise PilotError(failure, str(exc)) from None
        return process
