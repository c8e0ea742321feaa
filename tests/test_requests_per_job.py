"""What a multi-job pilot costs the server: requests per job, connections, TLS handshakes.

A real pilot runs three jobs whose transformation is the same URL on the dev server,
counted on the server's side (its request log) and on the pilot's (its summary):

* each job costs four calls (job request, ``starting``, ``running``, final update);
* the transformation is downloaded once, not once per job;
* with the server keeping connections open, the pilot's calls share kept-alive TLS
  connections (a second one only while two calls overlap); with an Apache-like server that closes idle
  connections after 1 s and keeps TLS sessions, a new connection resumes the session.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from pilot.devserver.files import request_counts
from pilot.devserver.server import DevServer, start_dev_server
from pilot.errors import ExitCode

from .harness import pilot_service, run_to_end

reactor: Any = _reactor
QUEUE = "COST_QUEUE"
SCRIPT = b'#!/bin/bash\nsleep "${1:-0}"\n'


class RequestsPerJobTests(TestCase):
    timeout = 120

    async def start(self, **server_options: Any) -> DevServer:
        self.base = Path(self.mktemp()).absolute()
        files = self.base / "files"
        files.mkdir(parents=True)
        (files / "sleeper.sh").write_bytes(SCRIPT)
        server = await start_dev_server(
            reactor, self.base / "server", queues={QUEUE: {"timefloor": 10}}, files=files, **server_options
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(server.stop()))
        return server

    async def run_three_jobs(
        self, server: DevServer, pause: str = "0"
    ) -> tuple[dict[str, int], dict[str, Any]]:
        job: dict[str, Any] = {
            "computingSite": QUEUE,
            "prodSourceLabel": "managed",
            "transformation": f"{server.url}/trf/sleeper.sh",
            "jobPars": pause,
            "logFile": "job.log.tgz",
            "scopeLog": "it",
        }
        await server.submit([dict(job) for _ in range(3)])
        service = pilot_service(server, QUEUE, self.base / "pilot", getjob_requests=1)
        await run_to_end(service)
        self.assertEqual(service.exit_code, ExitCode.OK)
        self.assertEqual([s.state for s in service.summaries], ["finished"] * 3)
        summary = json.loads((self.base / "pilot" / "summary.json").read_text())
        return request_counts(server.request_log.entries), summary["pilot"]

    async def test_four_calls_per_job_and_one_download(self) -> None:
        server = await self.start()
        counts, pilot = await self.run_three_jobs(server)
        self.assertEqual(counts["GET /trf/sleeper.sh"], 1, "the transformation is fetched once per pilot")
        acquires = counts["POST /api/v1/pilot/acquire_jobs"]
        self.assertEqual(acquires, 4, "one per job, and one that found no job")
        self.assertEqual(counts["POST /api/v1/pilot/update_job"], 3 * 3, "starting, running, final")
        self.assertEqual(pilot["downloads"], {"fetched": 1, "revalidated": 0})
        connections = pilot["connections"]
        # 22 calls; a second connection only while two calls overlap (the node report at start)
        self.assertLessEqual(connections["connections_opened"], 2, "calls reuse kept-alive connections")
        self.assertEqual(
            connections["full_handshakes"] + connections["resumed_handshakes"],
            connections["connections_opened"],
        )
        self.assertEqual(connections["requests"], sum(counts.values()), "the server saw every request")

    async def test_an_apache_like_server_gets_resumed_sessions(self) -> None:
        server = await self.start(idle_timeout=0.5, tls_sessions=True)
        counts, pilot = await self.run_three_jobs(server, pause="1")
        connections = pilot["connections"]
        self.assertGreater(connections["connections_opened"], 1, "the server closed idle connections")
        self.assertEqual(connections["full_handshakes"], 1, "later connections resumed the TLS session")
        self.assertEqual(connections["resumed_handshakes"], connections["connections_opened"] - 1)
        self.assertEqual(counts["GET /trf/sleeper.sh"], 1)
