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
