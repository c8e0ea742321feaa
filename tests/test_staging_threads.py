"""Stage-in with real threads, real copy processes and checksum followers on (issue 11, defect 1).

32 inputs at parallelism 16 go through the real local copytool, whose program here
writes its copy in chunks with pauses (a slow storage, a real child process), while a
checksum follower follows every input.  The tools' blocking calls go to a pool of 10
threads — the size of the reactor's default pool that ``pilot.tap`` handed down.
Followers that held a thread for a whole transfer (7c27346) took all 10, the tools'
``Path.exists`` queued behind them, and every transfer stalled until its time-out.

"Promptly" is relative: a probe call submitted to the same pool every 20 ms during
the run must start within half the median transfer's duration.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from pilot.model.job import Checksum
from pilot.staging.engine import StagingEngine
from pilot.staging.plan import FileTransfer
from pilot.staging.registry import CopytoolRegistry
from pilot.staging.tools.base import ToolContext
from pilot.staging.tools.local import LocalCopyTool
from pilot.staging.transfer import Attempt, Direction

reactor: Any = _reactor

FILES = 32
PARALLEL = 16
SIZE = 1 << 20
CHUNK = 128 << 10

#: ``slowcp [--] SOURCE DESTINATION``: copies in chunks, pausing after each (slow storage).
SLOW_CP = """#!{python}
import sys, time
source, destination = [a for a in sys.argv[1:] if a != "--"]
with open(source, "rb") as reader, open(destination, "wb") as writer:
    while chunk := reader.read({chunk}):
        writer.write(chunk)
        writer.flush()
        time.sleep(0.02)
"""


class TimedPool:
    """A ThreadRunner on a pool of ``size`` threads that records how long each call queued."""

    def __init__(self, size: int, name: str) -> None:
        self.pool = ThreadPool(0, size, name)
        self.waits: list[tuple[str, float]] = []

    def __call__(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        submitted = time.monotonic()

        def timed() -> Any:
            self.waits.append((getattr(f, "__name__", "?"), time.monotonic() - submitted))
            return f(*args, **kwargs)

        return deferToThreadPool(reactor, self.pool, timed)


class StarvationTests(TestCase):
    timeout = 90

    def setUp(self) -> None:
        base = Path(self.mktemp()).absolute()
        self.source = base / "storage"
        self.workdir = base / "work"
        self.bin = base / "bin"
        for directory in (self.source, self.workdir, self.bin):
            directory.mkdir(parents=True)
        program = self.bin / "slowcp"
        program.write_text(SLOW_CP.format(python=sys.executable, chunk=CHUNK))
        program.chmod(0o755)

    def pool(self, size: int, name: str) -> TimedPool:
        timed = TimedPool(size, name)
        timed.pool.start()
        self.addCleanup(timed.pool.stop)
        return timed

    def transfers(self) -> list[FileTransfer]:
        result = []
        block = os.urandom(SIZE)
        for i in range(FILES):
            data = block[i:] + block[:i]
            (self.source / f"in{i}").write_bytes(data)
            result.append(
                FileTransfer(
                    direction=Direction.IN,
                    lfn=f"in{i}",
                    scope="test",
                    guid=f"g{i}",
                    local=self.workdir / f"in{i}",
                    size=SIZE,
                    checksum=Checksum("adler32", f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"),
                    activity="pr",
                    attempts=[Attempt("cp", f"file://{self.source}/in{i}", "LOCAL")],
                )
            )
        return result

    async def stage_in(self, in_thread: TimedPool, **engine: Any) -> tuple[list[FileTransfer], list[float]]:
        """Run the 32 transfers; returns them and the queueing delays of the mid-run probes."""
        context = ToolContext(
            spawner=reactor,
            clock=reactor,
            in_thread=in_thread,
            env={"PATH": f"{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}"},
            logdir=self.workdir / "logs",
        )
        registry = CopytoolRegistry({"cp": LocalCopyTool("cp", "slowcp", ())})
        staging = StagingEngine(
            registry,
            context,
            parallel=PARALLEL,
            follow_threshold=0,  # follow every input
            timeout_base=20.0,
            timeout_rate=1e12,
            **engine,
        )
        transfers = self.transfers()
        probes: list[float] = []

        def probe() -> None:
            submitted = time.monotonic()
            in_thread(time.monotonic).addCallback(lambda started: probes.append(started - submitted))

        prober = LoopingCall(probe)
        prober.clock = reactor
        prober.start(0.02, now=False)
        try:
            await staging.run(transfers)
        finally:
            prober.stop()
        return transfers, probes

    def assert_no_stall(self, transfers: list[FileTransfer], probes: list[float]) -> None:
        failed = {t.lfn: t.error.detail for t in transfers if t.error is not None}
        self.assertEqual(failed, {}, "no transfer stalls into its time-out")
        self.assertTrue(all(t.done for t in transfers))
        typical = statistics.median(t.duration for t in transfers)
        self.assertGreater(len(probes), 5, "probes ran during the transfers")
        self.assertLess(
            max(probes),
            typical / 2,
            f"a short call queued {max(probes):.3f} s; a transfer takes {typical:.3f} s",
        )

    async def test_32_inputs_at_parallelism_16_with_followers_on_the_tools_pool(self) -> None:
        """The worst wiring: followers share the tools' 10 threads (no checksum pool of their own)."""
        tools = self.pool(10, "tools")
        transfers, probes = await self.stage_in(tools)
        self.assert_no_stall(transfers, probes)

    async def test_followers_on_a_checksum_pool_of_their_own(self) -> None:
        tools = self.pool(10, "tools")
        checksums = self.pool(2, "checksums")
        transfers, probes = await self.stage_in(tools, checksum_runner=checksums)
        self.assert_no_stall(transfers, probes)
        self.assertGreaterEqual(len(checksums.waits), FILES, "the follower steps ran in the checksum pool")
        self.assertEqual({name for name, _ in checksums.waits}, {"_step"})
        self.assertNotIn("_step", {name for name, _ in tools.waits})
