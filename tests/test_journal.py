"""The pilot's journal: durable, ordered, locked by its live pilot, claimable when it is gone.

Unit tests of ``pilot.util.journal`` with real files and a real thread pool, a dead
pilot made by SIGKILLing a real process that holds a journal, and a real pilot's job
against the dev server, whose journal is read while the payload runs.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
from pathlib import Path
from typing import Any

import jsonschema
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.threads import deferToThreadPool
from twisted.internet.utils import getProcessValue
from twisted.trial.unittest import TestCase

from pilot.devserver.server import DevServer, start_dev_server
from pilot.util.journal import Journal, claim_orphans, journal_dir, read_journal

from .events import file_ready
from .harness import bash_job, pilot_service, run_to_end

reactor: Any = _reactor
QUEUE = "JOURNAL_QUEUE"
ROOT = Path(__file__).resolve().parent.parent
JOURNAL_SCHEMA = jsonschema.Draft202012Validator(
    json.loads((ROOT / "interfaces" / "journal.schema.json").read_text())
)


def in_thread(f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
    return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args, **kwargs)


class JournalFileTests(TestCase):
    async def test_entries_are_ordered_durable_and_group_committed(self) -> None:
        path = Path(self.mktemp()) / "journal" / "p.jsonl"
        journal = Journal(path, in_thread)
        await in_thread(journal.open)
        self.addCleanup(journal.close, remove=False)
        written = [journal.append("thing", n=n) for n in range(50)]
        await DeferredList(written, fireOnOneErrback=True)
        entries = read_journal(path)
        self.assertEqual([e["n"] for e in entries], list(range(50)))
        self.assertEqual([e["seq"] for e in entries], list(range(1, 51)))
        self.assertLess(journal.fsyncs, 50, "entries queued together share an fsync")
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)

    async def test_a_transfer_is_journaled_without_local_paths(self) -> None:
        from pilot.job.journal import JobJournal
        from pilot.staging.record import RecordEntry

        path = Path(self.mktemp()) / "journal" / "p.jsonl"
        journal = Journal(path, in_thread)
        await in_thread(journal.open)
        self.addCleanup(journal.close, remove=False)
        entry = RecordEntry(
            "out",
            "out.dat",
            "mc.out",
            7,
            "0bcc02aa",
            "cp",
            "file:///se/out.dat",
            "SITE_A",
            "/work/out.dat",
            0.1,
            1.0,
        )
        await JobJournal(journal, in_thread, 42).transfer_done(entry)
        (written,) = read_journal(path)
        JOURNAL_SCHEMA.validate(written)
        self.assertEqual(
            (written["kind"], written["panda_id"], written["adler32"]), ("transfer.done", 42, "0bcc02aa")
        )
        self.assertNotIn("local", written)

    async def test_a_torn_last_line_is_skipped(self) -> None:
        path = Path(self.mktemp())
        path.write_bytes(b'{"seq":1,"kind":"a"}\n{"seq":2,"kind":"b"}\n{"seq":3,"ki')
        self.assertEqual([e["kind"] for e in read_journal(path)], ["a", "b"])

    async def test_a_live_journal_is_not_claimed_and_a_closed_one_is(self) -> None:
        base = Path(self.mktemp())
        journal = Journal(journal_dir(base) / "live.jsonl", in_thread)
        await in_thread(journal.open)
        await journal.append("pilot.started")
        self.assertEqual(list(claim_orphans(base)), [], "its pilot still holds the lock")
        journal.close(remove=False)
        (claimed,) = list(claim_orphans(base))
        self.assertEqual([e["kind"] for e in claimed.entries()], ["pilot.started"])
        self.assertEqual(list(claim_orphans(base)), [], "claimed: locked by this pilot now")
        claimed.release(remove=True)
        self.assertFalse(claimed.path.exists())

    async def test_the_journal_of_a_killed_pilot_is_claimed(self) -> None:
        base = Path(self.mktemp()).absolute()
        base.mkdir(parents=True)
        ready = base / "ready"
        script = (
            "import fcntl, os, sys, time\n"
            "from pathlib import Path\n"
            "d = Path(sys.argv[1]) / 'journal'; d.mkdir(parents=True)\n"
            "fd = os.open(d / 'dead.jsonl', os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            'os.write(fd, b\'{"seq":1,"kind":"pilot.started"}\\n\'); os.fsync(fd)\n'
            "Path(sys.argv[2]).write_text('x')\n"
            "time.sleep(60)\n"
        )
        ended = getProcessValue(sys.executable, ["-c", script, str(base), str(ready)], reactor=reactor)
        await file_ready(ready)
        self.assertEqual(list(claim_orphans(base)), [])
        pid = _holder(base / "journal" / "dead.jsonl")
        os.kill(pid, signal.SIGKILL)
        await ended
        (claimed,) = list(claim_orphans(base))
        self.addCleanup(claimed.release, remove=False)
        self.assertEqual(claimed.entries()[0]["kind"], "pilot.started")


def _holder(path: Path) -> int:
    """The pid of the process holding ``path`` open (from /proc/locks would be fussier)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) == str(path):
                    return int(entry.name)
        except OSError:
            continue
    raise AssertionError(f"nobody holds {path}")


class PilotJournalTests(TestCase):
    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]  # trial awaits it
        self.base = Path(self.mktemp()).absolute()
        self.server: DevServer = await start_dev_server(reactor, self.base / "server", queues={QUEUE: {}})
        self.addCleanup(lambda: Deferred.fromCoroutine(self.server.stop()))

    async def test_a_running_job_is_in_the_journal_and_a_finished_pilot_removes_it(self) -> None:
        go = self.base / "go"
        started = self.base / "payload-started"
        (panda_id,) = await self.server.submit(
            bash_job(QUEUE, f"-c 'echo $$ > {started}; while [ ! -e {go} ]; do sleep 0.05; done'")
        )
        pilot_dir = self.base / "pilot"
        service = pilot_service(self.server, QUEUE, pilot_dir, getjob_requests=1)
        service.startService()
        self.addCleanup(lambda: go.write_text("go"))
        await file_ready(started)
        (path,) = list(journal_dir(pilot_dir).glob("*.jsonl"))
        # entries after the spawn are written as the pilot goes on: wait for the phase
        await file_ready(path, ready=lambda p: '"phase":"running"' in p.read_text())
        entries = read_journal(path)
        kinds = [e["kind"] for e in entries]
        self.assertEqual(kinds[0], "pilot.started")
        for kind in ("job.acquired", "job.workdir", "payload.starting", "payload.started"):
            self.assertIn(kind, kinds)
        self.assertLess(kinds.index("payload.starting"), kinds.index("payload.started"))
        acquired = next(e for e in entries if e["kind"] == "job.acquired")
        self.assertEqual(acquired["panda_id"], panda_id)
        definition = Path(acquired["definition"])
        self.assertEqual(stat.S_IMODE(definition.stat().st_mode), 0o600)
        self.assertEqual(json.loads(definition.read_text())["PandaID"], panda_id)
        self.assertNotIn(
            str(definition.parent), next(e for e in entries if e["kind"] == "job.workdir")["workdir"]
        )
        payload = next(e for e in entries if e["kind"] == "payload.started")
        self.assertEqual(payload["pid"], _session_leader(int(started.read_text())))
        phases = [e["phase"] for e in entries if e["kind"] == "job.phase"]
        self.assertEqual(phases[-1], "running")
        for entry in entries:
            JOURNAL_SCHEMA.validate(entry)
        go.write_text("go")
        await service.when_finished()
        await service.stopService()
        self.assertFalse(path.exists(), "every final update delivered: the journal is gone")
        self.assertEqual(list(journal_dir(pilot_dir).iterdir()), [])

    async def test_a_pilot_whose_final_update_is_lost_keeps_its_journal(self) -> None:
        from pilot.service import jobloop

        self.patch(jobloop, "MIN_REMAINING_FOR_JOB", 0.5)
        go = self.base / "go"
        started = self.base / "payload-started"
        (panda_id,) = await self.server.submit(
            bash_job(QUEUE, f"-c 'echo $$ > {started}; while [ ! -e {go} ]; do sleep 0.05; done'")
        )
        pilot_dir = self.base / "pilot"
        service = pilot_service(
            self.server, QUEUE, pilot_dir, getjob_requests=1, lifetime=8.0, lifetime_margin=2.0
        )
        service.startService()
        await file_ready(started)
        await self.server.stop()
        go.write_text("go")
        await service.when_finished()
        await service.stopService()
        self.assertEqual(service.summaries[0].final_update, "lost")
        (path,) = list(journal_dir(pilot_dir).glob("*.jsonl"))
        entries = read_journal(path)
        kinds = [e["kind"] for e in entries]
        self.assertIn("final.sent", kinds)
        self.assertNotIn("final.acked", kinds)
        final = next(e for e in entries if e["kind"] == "final.sent")
        self.assertEqual((final["panda_id"], final["state"]), (panda_id, "finished"))
        self.assertEqual(final["fields"]["job_id"], panda_id)
        self.assertEqual(entries[-1]["kind"], "pilot.ended")
        self.assertFalse(entries[-1]["complete"])
        for entry in entries:
            JOURNAL_SCHEMA.validate(entry)
        # the server is back; the next pilot on this work area delivers the update, once
        port = self.server.port
        self.server = await start_dev_server(reactor, self.base / "server", port=port, queues={QUEUE: {}})
        successor = pilot_service(self.server, QUEUE, pilot_dir, getjob_requests=1)
        await run_to_end(successor)
        view: Any = await self.server.job(panda_id)
        self.assertEqual(view["jobStatus"], "finished")
        self.assertIn("resumed:resend-final", successor.summaries[0].commands)
        self.assertEqual([u["state"] for u in view["updates"]].count("finished"), 1)
        self.assertEqual(list(journal_dir(pilot_dir).glob("*.jsonl")), [], "delivered: no journal left")


def _session_leader(pid: int) -> int:
    """The session id of ``pid``: the payload's launcher makes its process the session leader."""
    return os.getsid(pid)
