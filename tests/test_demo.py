"""The README's commands: the demo runs the three example jobs end to end, and twistd
lists both plug-ins."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from pilot.demo import run_demo
from pilot.demo_es import default_payload, run_es_demo
from pilot.localrun import child_environment

reactor: Any = _reactor


class DemoTests(TestCase):
    timeout = 120

    async def test_demo_runs_three_jobs(self) -> None:
        lines: list[str] = []
        run_dir = Path(self.mktemp()).absolute()
        code = await run_demo(reactor, run_dir, lines.append)
        text = "\n".join(lines)
        self.assertEqual(code, 0, text + (run_dir / "pilot.log").read_text()[-3000:])
        self.assertIn("3 of 3 jobs finished", text)
        rows = [line.split() for line in lines if line.strip() and line.split()[0].isdigit()]
        self.assertEqual([row[1:3] for row in rows], [["finished", "finished"]] * 3)
        self.assertTrue((run_dir / "pilot" / "pilotlog.json").stat().st_size > 0)


class EventServiceDemoTests(TestCase):
    timeout = 120

    async def test_demo_runs_an_event_service_job(self) -> None:
        lines: list[str] = []
        run_dir = Path(self.mktemp()).absolute()
        run_dir.mkdir(parents=True)
        payload = default_payload()
        assert payload is not None, "the checkout's tests/es_payload.py"
        code = await run_es_demo(reactor, run_dir, payload, lines.append)
        text = "\n".join(lines)
        self.assertEqual(code, 0, text + (run_dir / "pilot.log").read_text()[-3000:])
        fields = {line.split()[0]: line.split()[1] for line in lines if line.startswith("  ranges_")}
        self.assertEqual(fields, {"ranges_received": "400", "ranges_finished": "400", "ranges_failed": "0"})
        self.assertEqual(len(list((run_dir / "OS_ES").rglob("EventService_premerge_*.tar"))), 4)


class TwistdPluginTests(TestCase):
    timeout = 60

    async def test_twistd_lists_the_plugins(self) -> None:
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            [
                "-c",
                "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
                "--help",
            ],
            env=child_environment(),
            reactor=reactor,
        )
        commands = out.decode()
        self.assertIn("    pilot ", commands)
        self.assertIn("    panda-dev ", commands)
