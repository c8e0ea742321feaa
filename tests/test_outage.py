"""A server outage while a job runs: the payload goes on, nothing is lost, updates resume in order.

On ``task.Clock`` (the pilot's service with a scripted server): the server answers 503
to everything for a simulated hour while the payload runs and ends; heartbeats fail
and are not retried (the next one supersedes them), the job is not aborted, and the
final update, retried with backoff, arrives once the server is back.

For real (a real pilot against the dev server over HTTPS): the server is stopped for
60 s while the payload runs and ends, then started again on the same port with the
same database; the final update arrives and the job ends finished.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pilot.devserver.server import DevServer, start_dev_server

from .events import exists, file_ready
from .fakes import Scripted
from .harness import bash_job, pilot_service
from .test_service import T0, ServiceHarness, job

reactor: Any = _reactor
QUEUE = "OUTAGE_QUEUE"


class SimulatedOutageTests(SynchronousTestCase):
    def test_an_hour_without_a_server_loses_nothing(self) -> None:
        h = ServiceHarness(self)
        h.server.jobs.append(job(801))
        h.start()
        self.assertEqual(h.server.states(801), ["starting", "running"])
        down = [Scripted(503, b"Service Unavailable", "text/plain")] * 100_000
        h.server.scripted += down
        h.clock.advance(1800)  # a heartbeat into the outage
        h.clock.advance(1200)
        h.finish_payload(0)  # the payload ends during the outage: the final update waits
        h.clock.advance(600)  # the hour is over
        self.assertFalse(h.done, "the final update keeps trying while the server is away")
        tried = h.server.states(801)
        self.assertEqual(tried[:2], ["starting", "running"])
        self.assertIn("running", tried[2:], "a heartbeat went out into the outage (and failed)")
        self.assertGreaterEqual(tried.count("finished"), 1, "the final update went out into the outage")
        h.server.scripted.clear()  # the server is back
        while not h.done:
            h.clock.advance(min(d.getTime() for d in h.clock.getDelayedCalls()) - h.clock.seconds())
        states = h.server.states(801)
        self.assertEqual(states[-1], "finished")
        self.assertEqual(
            states.count("finished"), tried.count("finished") + 1, "accepted at the first try back"
        )
        self.assertNotIn("failed", states)
        self.assertEqual(h.service.summaries[0].final_update, "delivered")
        self.assertEqual(h.service.summaries[0].state, "finished")
        self.assertLessEqual(h.clock.seconds(), T0 + 3600 + 300, "within one backoff of the server's return")


class RealOutageTests(TestCase):
    timeout = 240

    async def test_the_server_away_for_a_minute(self) -> None:
        base = Path(self.mktemp()).absolute()
        server: DevServer = await start_dev_server(reactor, base / "server", queues={QUEUE: {}})
        port = server.port
        started, go = base / "started", base / "go"
        (panda_id,) = await server.submit(
            bash_job(QUEUE, f"-c 'touch {started}; while [ ! -e {go} ]; do sleep 0.1; done; echo done'")
        )
        service = pilot_service(server, QUEUE, base / "pilot", getjob_requests=1)
        service.startService()
        self.addCleanup(lambda: go.write_text("go"))  # never leave the payload behind
        await file_ready(started, ready=exists)
        await server.stop()
        go.write_text("go")  # the payload ends while the server is away
        await deferLater(reactor, 60.0, lambda: None)
        server = await start_dev_server(reactor, base / "server", port=port, queues={QUEUE: {}})
        self.addCleanup(lambda: Deferred.fromCoroutine(server.stop()))
        await service.when_finished()
        await service.stopService()
        view: Any = await server.job(panda_id)
        self.assertEqual(view["jobStatus"], "finished")
        self.assertEqual(service.summaries[0].final_update, "delivered")
