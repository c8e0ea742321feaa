"""A cgroup v2 per job, and nothing the job started survives it (issue 13, deliverable 5).

Real processes, a real cgroup v2 hierarchy, nothing of the kernel faked.  The adversary
is a payload that double-forks, calls ``setsid`` and ignores SIGTERM (it leaves the
payload's process group and is nobody's descendant), and a TERM-ignoring child that
stays in the payload's own group.  After a job, with a cgroup (``--cgroups auto``) or
without (``--cgroups off``: the final sweep by process group and environment marker),
at a normal end, after a SIGTERM abort and with ``--keep-workdirs all``, none of them
may remain, and a process that is not the job's (no marker, not in its groups, even one
with another job's marker) is never touched.

What this machine must have (``require_delegated_v2``): a cgroup v2 hierarchy in which
the tests can create a cgroup and move a process into it (root does, on a hybrid or
unified hierarchy).  Elsewhere those tests are skipped, under ``CI=true`` they fail.
``memory.max`` is tested only where the memory controller is available to the pilot's
cgroup; the controller write path is tested with whichever limit controller is there
(``hugetlb`` on a hybrid hierarchy).
"""

from __future__ import annotations

import os
import select
import signal
from pathlib import Path, PurePosixPath
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from pilot.config import CgroupMode, KeepWorkdirs
from pilot.devserver.server import DevServer, start_dev_server
from pilot.errorcodes import ErrorCode
from pilot.job.launcher import CGROUP_MEMORY_FACTOR, cgroup_limits
from pilot.model.job import parse_job
from pilot.monitor.limits import memory_limit_kb
from pilot.options.build import build_config
from pilot.process.cgroup import (
    JOIN_FAILED,
    CgroupUnavailable,
    JobCgroup,
    cgroup_prefix,
    enable_controllers,
    locate_own_cgroup,
    own_cgroup,
    own_v2_cgroup,
    v2_mounts,
)
from pilot.process.environment import JOB_MARKER_VARIABLE, job_marker
from pilot.process.jobscope import JobScope
from pilot.process.runner import ManagedProcess
from pilot.process.sweep import sweep
from pilot.process.waiting import all_readable
from pilot.queuedata import QueueData
from pilot.service import PilotService

from .events import file_ready
from .harness import bash_job, pilot_service

reactor: Any = _reactor
QUEUE = "CGROUP_QUEUE"
GRACE = 0.5


def in_thread(f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
    from twisted.internet.threads import deferToThread

    return deferToThread(f, *args, **kwargs)


def require_delegated_v2(test: TestCase | SynchronousTestCase) -> tuple[Path, PurePosixPath]:
    """The test process's own v2 cgroup, if a child can be created there and a process moved in."""
    try:
        own, name = locate_own_cgroup()
        probe = own / f"txpilot-test-{os.getpid()}"
        probe.mkdir()
        try:
            (probe / "cgroup.procs").open("w").close()
            if not os.access(own / "cgroup.procs", os.W_OK):
                raise PermissionError(f"{own}/cgroup.procs is not writable")
        finally:
            probe.rmdir()
    except (OSError, CgroupUnavailable) as exc:
        if os.environ.get("CI"):
            test.fail(f"CI needs a cgroup v2 hierarchy writable by the tests (root): {exc}")
        raise SkipTest(f"no writable cgroup v2 hierarchy: {exc}") from None
    return own, name


def alive(pidfd: int) -> bool:
    """Whether the process behind ``pidfd`` has not terminated (a pidfd is readable once it has)."""
    readable, _, _ = select.select([pidfd], [], [], 0)
    return not readable


class Watched:
    """Processes named by pid files, pinned by pidfds as soon as they are read."""

    def __init__(self, test: TestCase) -> None:
        self.test = test
        self.pidfds: dict[str, int] = {}

    async def pin(self, name: str, pid_file: Path, timeout: float = 30.0) -> int:
        await file_ready(pid_file, timeout=timeout)
        pid = int(pid_file.read_text())
        pidfd = os.pidfd_open(pid)
        self.pidfds[name] = pidfd
        self.test.addCleanup(self._kill_and_close, pidfd)
        return pid

    def _kill_and_close(self, pidfd: int) -> None:
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(pidfd)

    def alive(self, name: str) -> bool:
        return alive(self.pidfds[name])


#: A payload's adversarial leftovers: a daemon (double fork, setsid, SIGTERM ignored) and a
#: TERM-ignoring child in the payload's own group; both write their pids into $1.  The
#: payload records its cgroup and environment marker, burns a little CPU, and with $2 =
#: hang waits (ignoring SIGTERM too) until it is killed.
PAYLOAD = r"""#!/bin/bash
dir="$1"
cat /proc/self/cgroup > "$dir/payload.cgroup"
echo "$TXPILOT_JOB_MARKER" > "$dir/payload.marker"
( setsid bash -c 'trap "" TERM; echo $$ > "$1/daemon.tmp"; mv "$1/daemon.tmp" "$1/daemon.pid"; exec sleep 1000' _ "$dir" & )
( trap "" TERM; echo $BASHPID > "$dir/child.tmp"; mv "$dir/child.tmp" "$dir/child.pid"; exec sleep 1000 ) &
while [ ! -e "$dir/daemon.pid" ] || [ ! -e "$dir/child.pid" ]; do sleep 0.02; done
i=0; while [ $i -lt 30000 ]; do i=$((i+1)); done
echo x > out.dat
echo ready > "$dir/ready"
if [ "$2" = hang ]; then trap "" TERM; exec sleep 1000; fi
exit 0
"""

#: A process that is not the job's: its own session, SIGTERM ignored, another job's marker.
BYSTANDER = 'trap \'\' TERM; echo $$ > "$1.tmp"; mv "$1.tmp" "$1"; exec sleep 1000'


class _Quiet(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


async def start_bystander(
    test: TestCase, watched: Watched, directory: Path, name: str, marker: str | None
) -> None:
    """A process of the test's own (not the job's), in its own session, ignoring SIGTERM."""
    env = {"PATH": "/usr/bin:/bin"}
    if marker is not None:
        env[JOB_MARKER_VARIABLE] = marker
    protocol = _Quiet()
    pid_file = directory / f"{name}.pid"
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        reactor.spawnProcess(
            protocol, "/usr/bin/setsid", ["setsid", "/bin/sh", "-c", BYSTANDER, "sh", str(pid_file)],
            env=env, childFDs={0: devnull, 1: devnull, 2: devnull},
        )  # fmt: skip
    finally:
        os.close(devnull)
    test.addCleanup(lambda: protocol.ended)  # runs after the SIGKILL of the pin's cleanup
    await watched.pin(name, pid_file)


# -- pure parts -------------------------------------------------------------------------


class DiscoveryTests(SynchronousTestCase):
    MOUNTINFO = (
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
    )

    def test_the_v2_mount_of_a_hybrid_hierarchy(self) -> None:
        self.assertEqual(v2_mounts(self.MOUNTINFO), [(Path("/sys/fs/cgroup/unified"), PurePosixPath("/"))])

    def test_escaped_mount_points_and_bind_mounted_subtrees(self) -> None:
        line = "50 1 0:40 /pilots /srv/cg\\040two rw - cgroup2 none rw\n"
        self.assertEqual(v2_mounts(line), [(Path("/srv/cg two"), PurePosixPath("/pilots"))])
        directory, name = own_cgroup(line, "0::/pilots/slot1\n")
        self.assertEqual(directory, Path("/srv/cg two/slot1"))
        self.assertEqual(name, PurePosixPath("/pilots/slot1"))
        with self.assertRaises(CgroupUnavailable):
            own_cgroup(line, "0::/elsewhere\n")

    def test_the_pilots_own_cgroup(self) -> None:
        self.assertEqual(own_v2_cgroup("4:memory:/x\n0::/system.slice/pilot.service\n"),
                         PurePosixPath("/system.slice/pilot.service"))  # fmt: skip
        self.assertIsNone(own_v2_cgroup("4:memory:/x\n"))
        self.assertIsNone(own_v2_cgroup("0::/gone (deleted)\n"))
        with self.assertRaises(CgroupUnavailable):
            own_cgroup("35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n", "0::/\n")
        with self.assertRaises(CgroupUnavailable):
            own_cgroup(self.MOUNTINFO, "4:memory:/\n")

    def test_this_machines_cgroup_is_found(self) -> None:
        own, name = require_delegated_v2(self)
        self.assertTrue((own / "cgroup.procs").exists())
        self.assertIn(f"0::{name}", Path("/proc/self/cgroup").read_text().splitlines())

    def test_the_prefix_is_an_argument_vector(self) -> None:
        tricky = Path("/sys/fs/cgroup/a b;$(touch x)")
        prefix = cgroup_prefix(tricky)
        self.assertEqual(prefix[-1], str(tricky), "the path is a positional parameter, not shell code")
        self.assertNotIn(str(tricky), prefix[2])
        self.assertEqual(prefix[3], "sh")

    def test_markers_are_unique_per_run(self) -> None:
        first, second = job_marker(1234, 2), job_marker(1234, 2)
        self.assertTrue(first.startswith("1234-2-"))
        self.assertNotEqual(first, second)
        self.assertEqual(len(first.rsplit("-", 1)[1]), 16)

    def test_limits_from_the_job(self) -> None:
        job = parse_job({"PandaID": "7", "transformation": "/bin/true", "minRamCount": "1000"})
        queue = QueueData(name=QUEUE, resource=QUEUE)
        limits = cgroup_limits(job, queue)
        monitor_limit = memory_limit_kb(job, queue)  # minRamCount times the queue's RSS grace
        assert monitor_limit is not None
        self.assertEqual(limits, {"memory.max": str(int(monitor_limit * 1024 * CGROUP_MEMORY_FACTOR))})
        queue = QueueData(name=QUEUE, resource=QUEUE, params={"pilot_pids_max": "4096"})
        self.assertEqual(cgroup_limits(job, queue)["pids.max"], "4096")

    def test_the_option(self) -> None:
        self.assertIs(build_config({"queue": "Q"}, {}).cgroups, CgroupMode.AUTO)
        self.assertIs(build_config({"queue": "Q", "cgroups": "off"}, {}).cgroups, CgroupMode.OFF)

    def test_without_a_file_descriptor_reactor_there_is_no_cgroup(self) -> None:
        scope = JobScope(
            panda_id=1, attempt=1, spawner=reactor, clock=Clock(), in_thread=in_thread, fdset=None
        )
        self.successResultOf(Deferred.fromCoroutine(scope.open()))
        self.assertIsNone(scope.cgroup)
        self.assertIn("file descriptors", scope.fallback_reason)


class WaitingTests(SynchronousTestCase):
    def test_without_file_descriptors_only_the_timeout_ends_a_wait(self) -> None:
        clock = Clock()
        waiting = all_readable(None, clock, [5], 3.0)
        clock.advance(2.9)
        self.assertNoResult(waiting)
        clock.advance(0.1)
        self.assertFalse(self.successResultOf(waiting))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_nothing_to_wait_for(self) -> None:
        self.assertTrue(self.successResultOf(all_readable(None, Clock(), [], 3.0)))

    def test_a_cancelled_wait_leaves_no_timer(self) -> None:
        clock = Clock()
        waiting = all_readable(None, clock, [5], 3.0)
        waiting.cancel()
        self.failureResultOf(waiting)
        self.assertEqual(clock.getDelayedCalls(), [])


class ReadableTests(TestCase):
    async def test_readable_descriptors_end_the_wait_at_once(self) -> None:
        first, second = os.pipe(), os.pipe()
        for r, w in (first, second):
            self.addCleanup(os.close, r)
            self.addCleanup(os.close, w)
        waiting = all_readable(reactor, reactor, [first[0], second[0]], 30.0)
        os.write(first[1], b"x")
        reactor.callLater(0.05, os.write, second[1], b"x")
        self.assertTrue(await waiting)


# -- the cgroup of one job, for real ----------------------------------------------------


class JobCgroupTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.own, self.own_name = require_delegated_v2(self)
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir()
        self.watched = Watched(self)

    async def cgroup(self, name: str = "job-1-1", **kwargs: Any) -> JobCgroup:
        cgroup = await JobCgroup.create(
            name, spawner=reactor, clock=reactor, fdset=reactor, in_thread=in_thread, **kwargs
        )
        self.addCleanup(self._remove, cgroup)
        return cgroup

    async def _remove(self, cgroup: JobCgroup) -> None:
        if cgroup.path.exists():
            await cgroup.kill(5.0)
            await cgroup.remove()

    def process(
        self, argv: list[str], cgroup: JobCgroup | None, env: dict[str, str] | None = None
    ) -> ManagedProcess:
        process = ManagedProcess(
            reactor, reactor, [*(cgroup.prefix() if cgroup else []), *argv],
            env=env or {"PATH": "/usr/bin:/bin"}, cwd=self.dir,
            stdout=self.dir / "out", stderr=self.dir / "err", kill_grace=GRACE,
        )  # fmt: skip
        self.addCleanup(process.sweep_now)
        return process

    async def start_payload(self, cgroup: JobCgroup, *, hang: bool = False) -> ManagedProcess:
        script = self.dir / "payload.sh"
        script.write_text(PAYLOAD)
        process = self.process(["/bin/bash", str(script), str(self.dir), "hang" if hang else "end"], cgroup)
        process.start()
        await self.watched.pin("daemon", self.dir / "daemon.pid")
        await self.watched.pin("child", self.dir / "child.pid")
        return process

    async def test_a_job_cgroup_under_the_pilots_own_and_its_processes_in_it(self) -> None:
        cgroup = await self.cgroup()
        self.assertEqual(cgroup.path, self.own / f"txpilot-{os.getpid()}" / "job-1-1")
        self.assertEqual(cgroup.name, self.own_name / f"txpilot-{os.getpid()}" / "job-1-1")
        process = await self.start_payload(cgroup)
        await process.wait()
        self.assertIn(f"0::{cgroup.name}", (self.dir / "payload.cgroup").read_text().splitlines())
        daemon = int((self.dir / "daemon.pid").read_text())
        self.assertIn(f"0::{cgroup.name}", Path(f"/proc/{daemon}/cgroup").read_text().splitlines())
        self.assertNotEqual(os.getsid(daemon), process.pid, "the daemon left the payload's session")

    async def test_reap_ends_a_double_forked_term_ignoring_daemon(self) -> None:
        cgroup = await self.cgroup()
        process = await self.start_payload(cgroup)
        await process.wait()
        self.assertTrue(self.watched.alive("daemon"))
        started = reactor.seconds()
        leftovers = await cgroup.reap(GRACE, 10.0)
        took = reactor.seconds() - started
        self.assertGreaterEqual(leftovers, 2)
        self.assertFalse(self.watched.alive("daemon"))
        self.assertFalse(self.watched.alive("child"))
        self.assertLess(took, GRACE + 2.0, "TERM, the grace, cgroup.kill, and the events say it is empty")
        usage = await cgroup.usage()
        self.assertIsNotNone(usage.cpu_seconds)
        assert usage.cpu_seconds is not None
        self.assertGreater(usage.cpu_seconds, 0.0)
        self.assertTrue(await cgroup.remove())
        self.assertFalse(cgroup.path.exists())
        self.assertFalse(cgroup.path.parent.exists(), "the pilot's parent goes with its last job")

    async def test_an_obedient_leftover_ends_without_the_grace(self) -> None:
        cgroup = await self.cgroup()
        script = (
            "(setsid sh -c 'echo $$ > d.tmp; mv d.tmp d.pid; exec sleep 1000' &); "
            "while [ ! -e d.pid ]; do sleep 0.02; done"
        )
        process = self.process(["/bin/sh", "-c", script], cgroup)
        process.start()
        await self.watched.pin("daemon", self.dir / "d.pid")
        await process.wait()
        started = reactor.seconds()
        self.assertEqual(await cgroup.reap(5.0, 10.0), 1)
        self.assertLess(reactor.seconds() - started, 1.0, "the wait is an event, not the whole grace")

    async def test_without_cgroup_kill_freeze_and_kill_each(self) -> None:
        cgroup = await self.cgroup()
        cgroup.kill_file = False  # as on Linux < 5.14
        process = await self.start_payload(cgroup, hang=True)
        self.assertGreaterEqual(await cgroup.reap(GRACE, 10.0), 3)
        await process.wait()
        self.assertFalse(self.watched.alive("daemon"))
        self.assertFalse(self.watched.alive("child"))
        self.assertEqual(
            (self.own / f"txpilot-{os.getpid()}" / "job-1-1" / "cgroup.freeze").read_text(), "0\n"
        )

    async def test_a_process_that_cannot_join_does_not_run(self) -> None:
        missing = self.dir / "no-such-cgroup"
        process = ManagedProcess(
            reactor, reactor, [*cgroup_prefix(missing), "/bin/sh", "-c", "echo ran > ran"],
            env={"PATH": "/usr/bin:/bin"}, cwd=self.dir, stdout=self.dir / "out", stderr=self.dir / "err",
        )  # fmt: skip
        process.start()
        outcome = await process.wait()
        self.assertEqual(outcome.exit_code, JOIN_FAILED)
        self.assertFalse((self.dir / "ran").exists())

    async def test_a_stale_cgroup_of_the_same_job_is_replaced(self) -> None:
        first = await self.cgroup("job-2-1")
        again = await self.cgroup("job-2-1")
        self.assertEqual(first.path, again.path)

    async def test_limit_controllers_are_enabled_down_to_the_job(self) -> None:
        """The write path of memory.max/pids.max, with a limit controller this machine has."""
        available = (self.own / "cgroup.controllers").read_text().split()
        controller = next((c for c in ("pids", "memory", "hugetlb") if c in available), None)
        if controller is None:
            raise SkipTest(f"no limit controller is available to {self.own} (only {available})")
        before = (self.own / "cgroup.subtree_control").read_text().split()
        if controller not in before:
            self.addCleanup(self._disable, controller)
        limit = {
            "pids": ("pids.max", "123"),
            "memory": ("memory.max", str(256 << 20)),
            "hugetlb": ("hugetlb.2MB.max", "0"),
        }[controller]
        cgroup = await self.cgroup("job-3-1", limits=dict([limit]))
        self.assertEqual(cgroup.limits, dict([limit]))
        self.assertEqual((cgroup.path / limit[0]).read_text().strip(), limit[1])
        self.assertIn(controller, (cgroup.path.parent / "cgroup.subtree_control").read_text().split())
        self.assertEqual(cgroup.note, "")

    def _disable(self, controller: str) -> None:
        parent = self.own / f"txpilot-{os.getpid()}"
        if not parent.exists():
            (self.own / "cgroup.subtree_control").write_text(f"-{controller}")

    async def test_memory_max_applied_where_the_controller_exists_else_noted(self) -> None:
        # on a hybrid host (memory bound to cgroup v1, as on this machine) the limit cannot be
        # applied: the job still gets its cgroup (kill, accounting) and the summary says why
        available = "memory" in (self.own / "cgroup.controllers").read_text().split()
        cgroup = await self.cgroup("job-4-1", limits={"memory.max": str(64 << 20)})
        process = self.process(["/bin/sh", "-c", "head -c 16M /dev/zero | tail -c 1 >/dev/null"], cgroup)
        process.start()
        await process.wait()
        usage = await cgroup.usage()
        if available:
            self.assertEqual(cgroup.limits, {"memory.max": str(64 << 20)})
            self.assertIsNotNone(usage.memory_peak)
        else:
            self.assertNotIn("memory.max", cgroup.limits)
            self.assertIn("memory", cgroup.note)

    def test_a_controller_the_cgroup_lacks_is_noted_not_fatal(self) -> None:
        own, _ = require_delegated_v2(self)
        parent = own / f"txpilot-{os.getpid()}-note"
        parent.mkdir()
        self.addCleanup(parent.rmdir)
        enabled, note = enable_controllers(own, parent, ["no-such-controller"])
        self.assertEqual(enabled, [])
        self.assertIn("no-such-controller", note)


# -- the fallback sweep, for real -------------------------------------------------------


class SweepTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir()
        self.watched = Watched(self)

    def process(self, argv: list[str], env: dict[str, str]) -> ManagedProcess:
        process = ManagedProcess(
            reactor, reactor, argv, env=env, cwd=self.dir,
            stdout=self.dir / "out", stderr=self.dir / "err", kill_grace=60.0,
        )  # fmt: skip
        self.addCleanup(process.sweep_now)
        return process

    async def test_marker_and_groups_reach_everything_and_nothing_else(self) -> None:
        marker = job_marker(5, 1)
        entry = f"{JOB_MARKER_VARIABLE}={marker}".encode()
        await start_bystander(self, self.watched, self.dir, "unmarked", None)
        await start_bystander(self, self.watched, self.dir, "other-job", job_marker(5, 1))
        script = self.dir / "payload.sh"
        script.write_text(PAYLOAD)
        process = self.process(
            ["/bin/bash", str(script), str(self.dir), "end"],
            {"PATH": "/usr/bin:/bin", JOB_MARKER_VARIABLE: marker},
        )
        pid = process.start()
        await self.watched.pin("daemon", self.dir / "daemon.pid")
        await self.watched.pin("child", self.dir / "child.pid")
        await process.wait()
        started = reactor.seconds()
        found = await sweep(
            entry, [pid], in_thread=in_thread, clock=reactor, fdset=reactor, grace=GRACE, backstop=10.0
        )
        took = reactor.seconds() - started
        self.assertEqual(found, 2)
        self.assertFalse(self.watched.alive("daemon"), "found by its marker")
        self.assertFalse(self.watched.alive("child"), "found by its group")
        self.assertTrue(self.watched.alive("unmarked"))
        self.assertTrue(self.watched.alive("other-job"))
        self.assertLess(took, GRACE + 2.0)

    async def test_a_child_that_scrubbed_its_environment_is_found_by_its_group(self) -> None:
        """While the group is provably the job's: its leader lives, or a marked member does."""
        marker = job_marker(7, 1)
        entry = f"{JOB_MARKER_VARIABLE}={marker}".encode()
        child = "trap '' TERM; echo $$ > c.tmp; mv c.tmp c.pid; exec /bin/sleep 1000"
        marked = "(trap '' TERM; echo $BASHPID > m.tmp; mv m.tmp m.pid; exec sleep 1000) &"
        script = f'env -i /bin/sh -c "{child}" & {marked} while [ ! -e c.pid ] || [ ! -e m.pid ]; do sleep 0.02; done'
        for anchored in (True, False):
            for name in ("c.pid", "m.pid"):
                (self.dir / name).unlink(missing_ok=True)
            env = {"PATH": "/usr/bin:/bin", JOB_MARKER_VARIABLE: marker}
            process = self.process(
                ["/bin/bash", "-c", script + ("; exec sleep 1000" if anchored else "")], env
            )
            pid = process.start()
            await self.watched.pin(f"scrubbed-{anchored}", self.dir / "c.pid")
            await self.watched.pin(f"marked-{anchored}", self.dir / "m.pid")
            if not anchored:
                await process.wait()
            found = await sweep(
                entry, [pid], in_thread=in_thread, clock=reactor, fdset=reactor, grace=GRACE, backstop=10.0,
                anchored=[pid] if anchored else [],
            )  # fmt: skip
            self.assertGreaterEqual(found, 3 if anchored else 2)  # the leader may be in a `sleep` too
            self.assertFalse(self.watched.alive(f"scrubbed-{anchored}"))
            await process.wait()

    async def test_a_recycled_group_id_is_never_swept(self) -> None:
        """A group of one of the job's ids, none of whose members is the job's: left alone."""
        await start_bystander(self, self.watched, self.dir, "recycled", None)
        group = os.getpgid(int((self.dir / "recycled.pid").read_text()))
        entry = f"{JOB_MARKER_VARIABLE}={job_marker(8, 1)}".encode()
        found = await sweep(
            entry, [group], in_thread=in_thread, clock=reactor, fdset=reactor, grace=GRACE, backstop=1.0
        )
        self.assertEqual(found, 0)
        self.assertTrue(self.watched.alive("recycled"))

    async def test_nothing_to_find_costs_one_scan(self) -> None:
        entry = f"{JOB_MARKER_VARIABLE}={job_marker(6, 1)}".encode()
        started = reactor.seconds()
        self.assertEqual(await sweep(entry, [], in_thread=in_thread, clock=reactor, fdset=reactor,
                                     grace=5.0, backstop=5.0), 0)  # fmt: skip
        self.assertLess(reactor.seconds() - started, 1.0)


# -- a real pilot's jobs ----------------------------------------------------------------


class PilotJobTests(TestCase):
    """Jobs of a real pilot against the dev server; the payload leaves the adversaries behind."""

    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]  # trial awaits it
        self.base = Path(self.mktemp()).absolute()
        self.dir = self.base / "payload"
        self.dir.mkdir(parents=True)
        (self.dir / "payload.sh").write_text(PAYLOAD)
        self.server: DevServer = await start_dev_server(reactor, self.base / "server", queues={QUEUE: {}})
        self.addCleanup(lambda: Deferred.fromCoroutine(self.server.stop()))
        self.watched = Watched(self)
        # not the job's: its own session, no marker / another job's marker, SIGTERM ignored
        await start_bystander(self, self.watched, self.dir, "unmarked", None)
        await start_bystander(self, self.watched, self.dir, "other-job", job_marker(9, 1))

    def service(self, cgroups: CgroupMode, **settings: Any) -> PilotService:
        return pilot_service(
            self.server, QUEUE, self.base / "pilot", getjob_requests=1, kill_grace=GRACE, cgroups=cgroups,
            **settings,
        )  # fmt: skip

    async def submit(self, hang: bool = False) -> int:
        (panda_id,) = await self.server.submit(
            bash_job(QUEUE, f"{self.dir / 'payload.sh'} {self.dir} {'hang' if hang else 'end'}")
        )
        return panda_id

    async def pin_leftovers(self) -> None:
        await self.watched.pin("daemon", self.dir / "daemon.pid")
        await self.watched.pin("child", self.dir / "child.pid")

    def assert_nothing_left(self) -> None:
        self.assertFalse(self.watched.alive("daemon"), "the double-forked, setsid, TERM-ignoring daemon")
        self.assertFalse(self.watched.alive("child"), "the TERM-ignoring child in the payload's group")
        self.assertTrue(self.watched.alive("unmarked"), "a process that is not the job's is never touched")
        self.assertTrue(self.watched.alive("other-job"), "nor one with another job's marker")

    def assert_in_cgroup(self, section: dict[str, Any]) -> None:
        name = section["path"]
        self.assertTrue(name.endswith(f"/txpilot-{os.getpid()}/job-{section['_panda_id']}-0"), name)
        self.assertIn(f"0::{name}", (self.dir / "payload.cgroup").read_text().splitlines())
        self.assertIsNone(section.get("fallback"))
        self.assertGreater(section["cpu_usage_s"], 0.0)
        self.assertIn("memory_peak", section)  # None here: memory is bound to cgroup v1
        self.assertTrue(section["removed"])
        own, _ = locate_own_cgroup()
        self.assertFalse((own / name.rsplit("/", 2)[-2]).exists(), "no cgroup left behind")

    def section(self, service: PilotService, panda_id: int) -> dict[str, Any]:
        (summary,) = service.summaries
        section = dict(summary.cgroup)
        section["_panda_id"] = panda_id
        return section

    async def run_job(self, cgroups: CgroupMode, **settings: Any) -> tuple[PilotService, int, dict[str, Any]]:
        if cgroups is CgroupMode.AUTO:
            require_delegated_v2(self)
        panda_id = await self.submit()
        service = self.service(cgroups, **settings)
        service.startService()
        self.addCleanup(service.stopService)
        await self.pin_leftovers()
        await service.when_finished()
        await service.stopService()
        view = await self.server.job(panda_id)
        self.assertEqual(view["jobStatus"], "finished", view.get("pilotErrorDiag"))
        return service, panda_id, self.section(service, panda_id)

    async def abort_job(self, cgroups: CgroupMode) -> tuple[PilotService, dict[str, Any]]:
        if cgroups is CgroupMode.AUTO:
            require_delegated_v2(self)
        panda_id = await self.submit(hang=True)
        service = self.service(cgroups)
        service.startService()
        self.addCleanup(service.stopService)
        await self.pin_leftovers()
        await file_ready(self.dir / "ready")
        service.handle_signal(signal.SIGTERM)
        await service.when_finished()
        await service.stopService()
        view = await self.server.job(panda_id)
        self.assertEqual(view["jobStatus"], "failed")
        self.assertEqual(view["pilotErrorCode"], ErrorCode.SIGTERM)
        return service, self.section(service, panda_id)

    async def test_normal_end_with_a_cgroup(self) -> None:
        _, _, section = await self.run_job(CgroupMode.AUTO)
        self.assert_nothing_left()
        self.assert_in_cgroup(section)
        self.assertGreaterEqual(section["leftovers"], 2)
        self.assertLess(section["reap_s"], GRACE + 2.0)
        self.assertEqual(section["limits"], {}, "no memory or pids controller in this cgroup v2")

    async def test_sigterm_abort_with_a_cgroup(self) -> None:
        _, section = await self.abort_job(CgroupMode.AUTO)
        self.assert_nothing_left()
        self.assert_in_cgroup(section)

    async def test_normal_end_without_cgroups(self) -> None:
        _, _, section = await self.run_job(CgroupMode.OFF)
        self.assert_nothing_left()
        self.assertEqual(section["fallback"], "process groups")
        self.assertEqual(section["reason"], "--cgroups off")
        self.assertGreaterEqual(section["leftovers"], 2)
        self.assertTrue(
            (self.dir / "payload.marker").read_text().strip().startswith(f"{section['_panda_id']}-0-")
        )

    async def test_sigterm_abort_without_cgroups(self) -> None:
        _, section = await self.abort_job(CgroupMode.OFF)
        self.assert_nothing_left()
        self.assertEqual(section["fallback"], "process groups")

    async def test_keep_workdirs_all_with_a_cgroup(self) -> None:
        service, _, section = await self.run_job(CgroupMode.AUTO, keep_workdirs=KeepWorkdirs.ALL)
        self.assert_nothing_left()
        self.assert_in_cgroup(section)
        self.assertTrue(
            Path(service.summaries[0].workdir, "payload.stdout").exists(), "the directory is kept"
        )

    async def test_keep_workdirs_all_without_cgroups(self) -> None:
        service, _, section = await self.run_job(CgroupMode.OFF, keep_workdirs=KeepWorkdirs.ALL)
        self.assert_nothing_left()
        self.assertEqual(section["fallback"], "process groups")
        self.assertTrue(
            Path(service.summaries[0].workdir, "payload.stdout").exists(), "the directory is kept"
        )
