"""Everything one job starts, and the guarantee that none of it outlives the job.

A ``JobScope`` belongs to one job's launcher (``pilot.job.launcher``).  Every process the
launcher builds passes through it:

* ``environ``: the job's marker (``TXPILOT_JOB_MARKER``, ``pilot.process.environment``)
  is added, so that whatever the process starts carries it too;
* ``argv``: with a cgroup, the join prefix (``pilot.process.cgroup.cgroup_prefix``) goes
  in front, so the process is in the job's cgroup before it runs anything;
* ``adopt``: the ``ManagedProcess`` is remembered, its pid being one of the job's
  process groups.

``open`` (the setup phase) creates the job's cgroup when ``use_cgroups`` and the pilot
has a delegated cgroup v2 subtree; otherwise one log line says why and the job relies
on the fallback.  ``end`` (the finish phase, before anything else there, whatever
``--keep-workdirs`` says) removes everything the job left running and waits until it
is gone: with a cgroup, ``reap`` (TERM, ``kill_grace``, ``cgroup.kill``) then the
cgroup's accounting and removal; without one, the final sweep of the job's process
groups and of the processes carrying its marker (``pilot.process.sweep``, which
counts a group only while it is provably the job's).  If a group of one of the job's
ids still exists after its cgroup was emptied (a process that moved itself out, or a
recycled id), the sweep runs too.  ``end`` returns the job summary's ``cgroup``
section and can be awaited again (the same section).

Thread work falls back to running inline once the pilot's pool is stopping: a job
ending during shutdown must still leave nothing behind.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFDSet, IReactorProcess, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from pilot.logs import pilot_observer
from pilot.process.cgroup import CgroupUnavailable, JobCgroup
from pilot.process.environment import JOB_MARKER_VARIABLE, job_marker
from pilot.process.runner import ManagedProcess
from pilot.process.sweep import sweep
from pilot.util.threads import PoolStopped, ThreadRunner

T = TypeVar("T")

#: The summary's ``fallback`` value: the job's processes were found by group and marker.
FALLBACK = "process groups"


def _inline_when_stopped(in_thread: ThreadRunner) -> ThreadRunner:
    def run(f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        def inline(failure: Failure) -> T:
            failure.trap(PoolStopped)
            return f(*args, **kwargs)

        return in_thread(f, *args, **kwargs).addErrback(inline)

    return run


def _group_alive(pgid: int) -> bool:
    if pgid == os.getpgrp():
        return False
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class JobScope:
    """One job's processes: marker, cgroup, groups; see the module docstring."""

    log = Logger(observer=pilot_observer)

    def __init__(
        self,
        *,
        panda_id: int,
        attempt: int | None,
        spawner: IReactorProcess,
        clock: IReactorTime,
        in_thread: ThreadRunner,
        fdset: IReactorFDSet | None,
        kill_grace: float = 10.0,
        backstop: float = 30.0,
        use_cgroups: bool = True,
        limits: Mapping[str, str] = {},
        marker: str | None = None,
    ) -> None:
        self.panda_id = panda_id
        self.attempt = attempt
        #: The value of ``TXPILOT_JOB_MARKER`` for this run of the job (a successor that
        #: resumes the job passes the dead pilot's, so that its final sweep finds them too).
        self.marker = marker or job_marker(panda_id, attempt)
        self._spawner = spawner
        self._clock = clock
        self._in_thread = _inline_when_stopped(in_thread)
        self._fdset = fdset
        self.kill_grace = kill_grace
        self.backstop = backstop
        self._use_cgroups = use_cgroups
        self._limits = dict(limits)
        self.cgroup: JobCgroup | None = None
        #: Why the job has no cgroup ("" while it has one or was never opened).
        self.fallback_reason = "" if use_cgroups else "--cgroups off"
        self._processes: list[ManagedProcess] = []
        self._section: dict[str, Any] | None = None

    async def open(self) -> None:
        """Create the job's cgroup if allowed and possible (else one log line); never raises."""
        if not self._use_cgroups or self.cgroup is not None:
            return
        if self._fdset is None:
            self.fallback_reason = "the reactor watches no file descriptors (cgroup.events)"
            return
        attempt = self.attempt if self.attempt is not None else 0
        try:
            self.cgroup = await JobCgroup.create(
                f"job-{self.panda_id}-{attempt}",
                spawner=self._spawner,
                clock=self._clock,
                fdset=self._fdset,
                in_thread=self._in_thread,
                limits=self._limits,
            )
        except CgroupUnavailable as exc:
            self.fallback_reason = str(exc)
            self.log.info(
                "job {pandaid}: no cgroup ({reason}); its process groups and environment marker instead",
                pandaid=self.panda_id, reason=self.fallback_reason, event="job.cgroup_fallback",
            )  # fmt: skip
            return
        self.log.info(
            "job {pandaid}: cgroup {path}{note}",
            pandaid=self.panda_id, path=str(self.cgroup.name),
            note=f" ({self.cgroup.note})" if self.cgroup.note else "", limits=self.cgroup.limits,
            event="job.cgroup",
        )  # fmt: skip

    # -- building processes ---------------------------------------------------------

    @property
    def marker_entry(self) -> bytes:
        """The marker as an entry of ``/proc/<pid>/environ``."""
        return f"{JOB_MARKER_VARIABLE}={self.marker}".encode()

    def environ(self, environ: Mapping[str, str]) -> dict[str, str]:
        return {**environ, JOB_MARKER_VARIABLE: self.marker}

    def argv(self, argv: Sequence[str]) -> list[str]:
        if self.cgroup is None:
            return list(argv)
        return [*self.cgroup.prefix(), *argv]

    def adopt(self, process: ManagedProcess) -> None:
        self._processes.append(process)

    @property
    def groups(self) -> frozenset[int]:
        """The job's process groups (pids of the processes started so far)."""
        return frozenset(p.pid for p in self._processes if p.pid is not None)

    # -- the end --------------------------------------------------------------------

    async def end(self) -> dict[str, Any]:
        """Remove whatever the job left running and wait until it is gone; the summary section."""
        if self._section is not None:
            return self._section
        started = self._clock.seconds()
        section: dict[str, Any] | None = None
        leftovers = 0
        if self.cgroup is not None:
            try:
                section, leftovers = await self._end_cgroup(self.cgroup)
            except OSError as exc:  # the cgroup broke under us: the sweep still finds the job's
                self.log.error(
                    "job {pandaid}: ending cgroup {path} failed: {error}",
                    pandaid=self.panda_id, path=str(self.cgroup.name), error=exc, event="job.cgroup_failed",
                )  # fmt: skip
                self.fallback_reason = f"the cgroup failed at the end: {exc}"
            else:
                if any(_group_alive(g) for g in self.groups):
                    leftovers += await self._sweep()
        if section is None:
            section = {"fallback": FALLBACK, "reason": self.fallback_reason}
            leftovers += await self._sweep()
        for process in self._processes:
            process.leftovers_gone()  # no SIGKILL timer of a leftover outlives the job
        section["leftovers"] = leftovers
        section["reap_s"] = round(self._clock.seconds() - started, 3)
        if leftovers:
            self.log.info(
                "job {pandaid}: {count} leftover processes ended in {seconds:.3f} s",
                pandaid=self.panda_id, count=leftovers, seconds=section["reap_s"], event="job.leftovers",
            )  # fmt: skip
        self._section = section
        return section

    async def _end_cgroup(self, cgroup: JobCgroup) -> tuple[dict[str, Any], int]:
        leftovers = await cgroup.reap(self.kill_grace, self.backstop)
        usage = await cgroup.usage()
        section: dict[str, Any] = {
            "path": str(cgroup.name),
            "memory_peak": usage.memory_peak,
            "cpu_usage_s": None if usage.cpu_seconds is None else round(usage.cpu_seconds, 3),
            "limits": dict(cgroup.limits),
        }
        if usage.oom_kills is not None:
            section["oom_kills"] = usage.oom_kills
        if cgroup.note:
            section["note"] = cgroup.note
        section["removed"] = await cgroup.remove()
        return section, leftovers

    async def _sweep(self) -> int:
        return await sweep(
            self.marker_entry,
            self.groups,
            in_thread=self._in_thread,
            clock=self._clock,
            fdset=self._fdset,
            grace=self.kill_grace,
            backstop=self.backstop,
            anchored=frozenset(p.pid for p in self._processes if p.pid is not None and p.running),
            label=f"job {self.panda_id}",
        )
