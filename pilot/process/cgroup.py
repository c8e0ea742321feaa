"""A cgroup v2 per job, where the pilot has a delegated subtree: limits, accounting, sure reaping.

**Where.** The cgroup v2 hierarchy is the ``cgroup2`` mount of ``/proc/self/mountinfo``;
the pilot's own cgroup is the ``0::/path`` line of ``/proc/self/cgroup``.  The pilot
creates ``txpilot-<pilot pid>`` below its own cgroup, never joins it, and gives each job
a leaf below that, ``txpilot-<pid>/job-<PandaID>-<attempt>``; the pilot itself stays
where it was.  The subtree counts as delegated when the pilot can create both
directories *and* a process can join the job's cgroup: a short ``sh`` is started
through ``cgroup_prefix`` to prove it before any job process relies on it.  Anything
else (no v2 hierarchy, ``EACCES``, ``EROFS``, ``EBUSY``, a probe that cannot join)
raises ``CgroupUnavailable``, and the job falls back to process groups and its
environment marker (``pilot.process.jobscope``).

**Limits.** ``memory.max``/``pids.max`` (any ``<controller>.<file>``) are written into the
job's cgroup.  Their controllers must be enabled in the ``cgroup.subtree_control`` of
every cgroup above it, down from the pilot's own: the pilot enables those listed in
its own ``cgroup.controllers``.  v2's no-internal-processes rule forbids enabling them
in a cgroup that holds processes (unless it is the root), so in a non-root own cgroup
that holds the pilot (systemd ``Delegate=yes`` puts the service there) the write fails
with ``EBUSY``: the job then runs without those limits, noted in its summary, with
everything else intact.  ``txpilot-<pid>`` never holds a process, and a job's cgroup
is a leaf, so both obey the rule.

**Joining.** ``cgroup_prefix(path)`` is an argument-vector prefix: ``/bin/sh -c 'echo $$ >
"$1/cgroup.procs" || exit 125; shift; exec "$@"' sh <path> argv...``.  The process
writes its own pid into the job's cgroup and only then ``exec``s what it runs, so
nothing it forks is ever outside.  The path is a positional parameter, never shell
code.  Exit status 125 means the process could not join and did not run.  ``sh`` adds
``PWD`` (the working directory) to the environment, as any shell does.

**Reaping.** ``reap(grace, backstop)``: SIGTERM to every member (by pidfd, after checking
that the pid is still in this cgroup, so a recycled pid is never hit), wait for
``populated 0`` in ``cgroup.events`` up to ``grace``, then ``cgroup.kill`` (Linux >= 5.14;
older kernels: freeze, SIGKILL every member, thaw, until empty) and wait again, up to
``backstop``.  The waits are events: ``cgroup.events`` in an epoll set with ``EPOLLPRI``,
the set in the reactor (``pilot.process.waiting``).  ``usage()`` then reads
``memory.peak`` (with the memory controller), ``memory.events``' ``oom_kill`` and
``cpu.stat``'s ``usage_usec`` (always there), and ``remove()`` deletes the leaf and, if
empty, the pilot's ``txpilot-<pid>``.

Every file operation runs through the ``ThreadRunner``: they are short, but a write to
a cgroup file can block (a migration waits for the cgroup lock).
"""

from __future__ import annotations

import errno
import os
import re
import select
import shutil
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IReactorFDSet, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from pilot.logs import pilot_observer
from pilot.process.waiting import all_readable
from pilot.util.records import record
from pilot.util.threads import ThreadRunner

SH = shutil.which("sh") or "/bin/sh"

#: Exit status of a process that could not join its job's cgroup (and did not run).
JOIN_FAILED = 125

#: What a process runs to join a cgroup before it ``exec``s its argv ($1: the cgroup).
JOIN_SCRIPT = 'echo $$ > "$1/cgroup.procs" || exit 125; shift; exec "$@"'

#: Seconds a process may take to join the job's cgroup (and end) when the pilot tries it.
PROBE_TIMEOUT = 10.0

#: SIGKILL rounds on a kernel without ``cgroup.kill`` before the pilot gives up.
FREEZE_ROUNDS = 5


class CgroupUnavailable(Exception):
    """No usable cgroup for jobs; the message is the reason, for one log line."""


def cgroup_prefix(path: Path) -> list[str]:
    """The argv prefix that makes a process join the cgroup ``path`` before it runs anything."""
    return [SH, "-c", JOIN_SCRIPT, "sh", str(path)]


# -- finding the hierarchy and the pilot's own cgroup (pure, then blocking) -------------


def _unescape(text: str) -> str:
    """A mountinfo field: spaces, tabs, newlines and backslashes are octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def v2_mounts(mountinfo: str) -> list[tuple[Path, PurePosixPath]]:
    """(mount point, root inside the hierarchy) of every ``cgroup2`` mount in ``mountinfo``."""
    found: list[tuple[Path, PurePosixPath]] = []
    for line in mountinfo.splitlines():
        fields, separator, rest = line.partition(" - ")
        parts = fields.split()
        if separator and rest.split(" ", 1)[0] == "cgroup2" and len(parts) >= 5:
            found.append((Path(_unescape(parts[4])), PurePosixPath(_unescape(parts[3]))))
    return found


def own_v2_cgroup(proc_cgroup: str) -> PurePosixPath | None:
    """The pilot's v2 cgroup from ``/proc/self/cgroup`` (the ``0::`` line), None without one."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            path = line[3:]
            return None if path.endswith(" (deleted)") or not path.startswith("/") else PurePosixPath(path)
    return None


def own_cgroup(mountinfo: str, proc_cgroup: str) -> tuple[Path, PurePosixPath]:
    """(directory, path in the hierarchy) of the pilot's own v2 cgroup; ``CgroupUnavailable`` if none."""
    mounts = v2_mounts(mountinfo)
    if not mounts:
        raise CgroupUnavailable("no cgroup v2 hierarchy is mounted")
    own = own_v2_cgroup(proc_cgroup)
    if own is None:
        raise CgroupUnavailable("the pilot is in no cgroup v2 cgroup")
    for point, root in mounts:
        if own == root or root in own.parents:
            return point / own.relative_to(root), own
    raise CgroupUnavailable(f"the pilot's cgroup {own} is not under a mounted cgroup2 hierarchy")


def locate_own_cgroup() -> tuple[Path, PurePosixPath]:
    """Blocking: the pilot's own v2 cgroup, from ``/proc/self``."""
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
        proc_cgroup = Path("/proc/self/cgroup").read_text()
    except OSError as exc:
        raise CgroupUnavailable(f"cannot read /proc/self: {exc.strerror}") from None
    return own_cgroup(mountinfo, proc_cgroup)


# -- blocking file operations (run in the ThreadRunner) -----------------------------------


def _read(path: Path) -> str:
    with open(path, encoding="ascii") as file:
        return file.read()


def _write(path: Path, text: str) -> None:
    with open(path, "w", encoding="ascii") as file:
        file.write(text)


def enable_controllers(own: Path, parent: Path, wanted: Sequence[str]) -> tuple[list[str], str]:
    """Enable ``wanted`` (those ``own`` has) for ``parent``'s children; returns (enabled, why not all)."""
    available = set(_read(own / "cgroup.controllers").split())
    enabled = [name for name in wanted if name in available]
    missing = [name for name in wanted if name not in available]
    note = f"controllers not available to the pilot's cgroup: {', '.join(missing)}" if missing else ""
    for directory in (own, parent):
        active = set(_read(directory / "cgroup.subtree_control").split())
        for name in list(enabled):
            if name in active:
                continue
            try:
                _write(directory / "cgroup.subtree_control", f"+{name}")
            except OSError as exc:
                enabled.remove(name)
                reason = (
                    f"{directory} holds processes (v2 allows no controllers there)"
                    if exc.errno == errno.EBUSY
                    else exc.strerror
                )
                note = f"cannot enable {name}: {reason}"
    return enabled, note


def make_job_cgroup(
    own: Path, parent_name: str, job_name: str, controllers: Sequence[str]
) -> tuple[Path, list[str], str]:
    """Create ``own/parent_name/job_name``; returns (its directory, controllers enabled, note)."""
    parent = own / parent_name
    job = parent / job_name
    for _ in range(3):  # another job of this pilot may remove an empty parent meanwhile
        parent.mkdir(exist_ok=True)
        enabled, note = enable_controllers(own, parent, controllers) if controllers else ([], "")
        try:
            job.mkdir()
        except FileExistsError:
            job.rmdir()  # left by an earlier run of the same job; OSError (EBUSY) if it is not empty
            job.mkdir()
        except FileNotFoundError:
            continue
        return job, enabled, note
    raise CgroupUnavailable(f"{parent} keeps disappearing")


def write_limits(job: Path, limits: Mapping[str, str]) -> dict[str, str]:
    """Write each limit whose file exists (its controller is enabled); returns those written."""
    written: dict[str, str] = {}
    for name, value in limits.items():
        if (job / name).exists():
            _write(job / name, value)
            written[name] = _read(job / name).strip()
    return written


def members(job: Path) -> list[int]:
    try:
        return [int(line) for line in _read(job / "cgroup.procs").split()]
    except FileNotFoundError:
        return []


def _in_cgroup(pid: int, name: PurePosixPath) -> bool:
    try:
        lines = _read(Path(f"/proc/{pid}/cgroup")).splitlines()
    except OSError:
        return False
    return f"0::{name}" in lines


def signal_members(job: Path, name: PurePosixPath, signum: int) -> list[int]:
    """``signum`` to every member of the cgroup, each by pidfd once confirmed a member."""
    signalled: list[int] = []
    for pid in members(job):
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            if _in_cgroup(pid, name):  # still the process the list named, not a recycled pid
                signal.pidfd_send_signal(pidfd, signum)
                signalled.append(pid)
        except OSError:
            pass
        finally:
            os.close(pidfd)
    return signalled


def _state(text: str) -> dict[str, int]:
    state: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            state[key] = int(value)
    return state


@record(frozen=True)
class CgroupUsage:
    """What a job's cgroup counted: memory high-water mark (bytes), CPU seconds, OOM kills."""

    memory_peak: int | None
    cpu_seconds: float | None
    oom_kills: int | None


def read_usage(job: Path) -> CgroupUsage:
    def value(name: str, key: str | None = None) -> int | None:
        try:
            text = _read(job / name)
        except (OSError, UnicodeDecodeError):
            return None
        if key is None:
            return int(text) if text.strip().isdigit() else None
        return _state(text).get(key)

    usec = value("cpu.stat", "usage_usec")
    return CgroupUsage(
        memory_peak=value("memory.peak"),
        cpu_seconds=None if usec is None else usec / 1e6,
        oom_kills=value("memory.events", "oom_kill"),
    )


def remove_job_cgroup(job: Path) -> None:
    """Remove the job's (empty) cgroup and, when it has no other job, the pilot's parent."""
    job.rmdir()
    try:
        job.parent.rmdir()
    except OSError:
        pass  # another job's cgroup, or another pilot of the same pid namespace


class _EventsFile:
    """``cgroup.events`` open, in an epoll set that is readable whenever the file changes."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._epoll = select.epoll()
        self._epoll.register(self._fd, select.EPOLLPRI)
        self.state = self.read()  # reading arms the notification

    def fileno(self) -> int:
        return self._epoll.fileno()

    def read(self) -> dict[str, int]:
        self.state = _state(os.pread(self._fd, 4096, 0).decode("ascii"))
        self._epoll.poll(0)  # consume the readiness the read has answered
        return self.state

    def close(self) -> None:
        self._epoll.close()
        os.close(self._fd)


# -- the job's cgroup -------------------------------------------------------------------


class _Probe(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[int | None] = Deferred()
        self.errors = b""

    def errReceived(self, data: bytes) -> None:
        self.errors = (self.errors + data)[-2000:]

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        if isinstance(value, ProcessDone):
            self.ended.callback(0)
        elif isinstance(value, ProcessTerminated):
            self.ended.callback(value.exitCode)
        else:
            self.ended.callback(None)


class JobCgroup:
    """One job's cgroup; see the module docstring.  Build it with ``create``."""

    log = Logger(observer=pilot_observer)

    def __init__(
        self,
        path: Path,
        name: PurePosixPath,
        *,
        clock: IReactorTime,
        fdset: IReactorFDSet | None,
        in_thread: ThreadRunner,
        limits: Mapping[str, str] = {},
        note: str = "",
    ) -> None:
        self.path = path
        #: Its path in the hierarchy, as ``/proc/<pid>/cgroup`` names it.
        self.name = name
        self._clock = clock
        self._fdset = fdset
        self._in_thread = in_thread
        #: The limits in force (file → value as the kernel reads it back).
        self.limits = dict(limits)
        #: Why a limit asked for is not in force ("" when all are).
        self.note = note
        #: Whether the kernel has ``cgroup.kill`` (Linux >= 5.14); else freeze and kill.
        self.kill_file = True

    @classmethod
    async def create(
        cls,
        job_name: str,
        *,
        spawner: IReactorProcess,
        clock: IReactorTime,
        fdset: IReactorFDSet | None,
        in_thread: ThreadRunner,
        limits: Mapping[str, str] = {},
        parent_name: str | None = None,
    ) -> JobCgroup:
        """The job's new cgroup under the pilot's; ``CgroupUnavailable`` when there can be none."""
        parent_name = parent_name or f"txpilot-{os.getpid()}"
        try:
            own, own_name = await in_thread(locate_own_cgroup)
            controllers = sorted({name.split(".", 1)[0] for name in limits})
            path, enabled, note = await in_thread(make_job_cgroup, own, parent_name, job_name, controllers)
        except OSError as exc:
            raise CgroupUnavailable(f"cannot create the job's cgroup: {exc}") from None
        cgroup = cls(
            path, own_name / parent_name / job_name, clock=clock, fdset=fdset, in_thread=in_thread, note=note
        )
        try:
            cgroup.kill_file = await in_thread((path / "cgroup.kill").exists)
            wanted = {k: v for k, v in limits.items() if k.split(".", 1)[0] in enabled}
            cgroup.limits = await in_thread(write_limits, path, wanted)
            await cgroup._probe(spawner)
        except (OSError, CgroupUnavailable) as exc:
            await cgroup.remove()
            if isinstance(exc, CgroupUnavailable):
                raise
            raise CgroupUnavailable(f"cannot set up {path}: {exc}") from None
        return cgroup

    async def _probe(self, spawner: IReactorProcess) -> None:
        """Prove that a process can join: ``sh`` through the prefix, running ``sh -c :``."""
        probe = _Probe()
        argv = [*cgroup_prefix(self.path), SH, "-c", ":"]
        spawner.spawnProcess(probe, SH, argv, env={}, childFDs={0: "w", 1: "r", 2: "r"})
        try:
            code = await probe.ended.addTimeout(PROBE_TIMEOUT, self._clock)
        except TimeoutError:
            raise CgroupUnavailable(f"a process joining {self.path} did not end") from None
        if code != 0:
            detail = probe.errors.decode("utf-8", "replace").strip() or f"exit status {code}"
            raise CgroupUnavailable(f"a process cannot join {self.path}: {detail}")

    def prefix(self) -> list[str]:
        return cgroup_prefix(self.path)

    # -- ending ---------------------------------------------------------------------

    async def reap(self, grace: float, backstop: float) -> int:
        """TERM every member, KILL what is left after ``grace``; returns how many there were.

        Fires once the cgroup is empty, or after ``backstop`` more seconds if a member
        does not die of SIGKILL (uninterruptible sleep): that is logged.
        """
        found = await self._in_thread(signal_members, self.path, self.name, signal.SIGTERM)
        if not found and await self._wait_for("populated", 0, 0.0):
            return 0
        if not await self._wait_for("populated", 0, grace):
            await self.kill(backstop)
            if not await self._wait_for("populated", 0, backstop):
                left = await self._in_thread(members, self.path)
                self.log.error(
                    "{count} processes of cgroup {path} did not end {backstop} s after SIGKILL: {pids}",
                    count=len(left), path=str(self.name), backstop=backstop, pids=left,
                    event="cgroup.unkillable",
                )  # fmt: skip
        return len(found)

    async def kill(self, backstop: float) -> None:
        """SIGKILL everything in the cgroup: ``cgroup.kill``, or freeze, kill each, thaw."""
        if self.kill_file:
            try:
                await self._in_thread(_write, self.path / "cgroup.kill", "1")
                return
            except FileNotFoundError:
                self.kill_file = False
        for _ in range(FREEZE_ROUNDS):
            frozen = await self._freeze(True)
            if frozen:  # nothing can fork now: the list is complete
                await self._wait_for("frozen", 1, min(1.0, backstop))
            await self._in_thread(signal_members, self.path, self.name, signal.SIGKILL)
            if frozen:
                await self._freeze(False)
            if await self._wait_for("populated", 0, backstop / FREEZE_ROUNDS):
                return

    async def _freeze(self, frozen: bool) -> bool:
        try:
            await self._in_thread(_write, self.path / "cgroup.freeze", "1" if frozen else "0")
        except OSError:
            return False  # no freezer (Linux < 5.2): kill each, round after round
        return True

    async def _wait_for(self, key: str, value: int, timeout: float) -> bool:
        """Whether ``cgroup.events`` says ``key value`` within ``timeout`` (on the clock)."""
        try:
            events = await self._in_thread(_EventsFile, self.path / "cgroup.events")
        except FileNotFoundError:
            return True  # the cgroup is gone: nothing is in it
        try:
            deadline = self._clock.seconds() + timeout
            state = events.state
            while state.get(key) != value:
                left = deadline - self._clock.seconds()
                if left <= 0:
                    return False
                await all_readable(self._fdset, self._clock, [events.fileno()], left)
                state = await self._in_thread(events.read)
            return True
        finally:
            events.close()

    async def usage(self) -> CgroupUsage:
        return await self._in_thread(read_usage, self.path)

    async def remove(self) -> bool:
        """Remove the (empty) cgroup; False, logged, if it cannot be."""
        try:
            await self._in_thread(remove_job_cgroup, self.path)
        except FileNotFoundError:
            return True
        except OSError as exc:
            self.log.error(
                "cannot remove cgroup {path}: {error}", path=str(self.name), error=exc.strerror,
                event="cgroup.remove_failed",
            )  # fmt: skip
            return False
        return True
