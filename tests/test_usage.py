"""Resource use of a process tree (``pilot.process.usage``), read from a real tree."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from pilot.process.runner import ManagedProcess
from pilot.process.usage import TreeUsage, tree_usage, tree_usage_in_thread
from pilot.util.threads import WorkerPool

from .events import file_ready

reactor: Any = _reactor


class TreeUsageTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.pool = WorkerPool(reactor, 1, "test-usage")
        self.pool.start()
        self.addCleanup(self.pool.stop)

    async def test_the_walk_runs_in_the_pool_and_counts_the_tree(self) -> None:
        process = ManagedProcess(
            reactor,
            reactor,
            ["/bin/bash", "-c", "sleep 1000 & sleep 1000 & sleep 1000 & touch ready; wait"],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            cwd=self.dir,
            stdout=self.dir / "out",
            stderr=self.dir / "err",
            kill_grace=1.0,
        )
        pid = process.start()
        self.addCleanup(process.terminate, "test over")
        await file_ready(self.dir / "ready", ready=lambda path: path.exists())
        threads: list[str] = []

        def recording(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
            def noted() -> Any:
                threads.append(threading.current_thread().name)
                return f(*args, **kwargs)

            return self.pool.run(noted)

        usage = await tree_usage_in_thread(recording, pid)
        self.assertEqual(usage.processes, 4, "bash and its three sleeps")
        self.assertGreater(usage.rss_kb, 0)
        self.assertEqual(len(threads), 1)
        self.assertTrue(threads[0].startswith("PoolThread-test-usage"))

    async def test_a_gone_process_uses_nothing(self) -> None:
        self.assertEqual(await tree_usage_in_thread(self.pool.runner, 2**22 + 12345), TreeUsage())
        self.assertEqual(tree_usage(2**22 + 12345), TreeUsage())
