"""The README and tox.ini tell an operator the truth: real options, working commands.

A new site operator follows the README literally: an option it names that the pilot
does not have, or a command that does not work where the README says it does, costs
them their first run.  These tests read the documents themselves.
"""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from pilot.options import PilotOptions

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")

#: Options in the README that belong to something other than ``twistd pilot``.
NOT_PILOT_OPTIONS = {
    "--pidfile": "twistd's own option",
    "-n": "twistd's own option (--nodaemon)",
    "--containerImage": "an option inside a job's jobPars",
    "--cksum": "xrdcp's option",
    "--rm-bad-cksum": "xrdcp's option",
}


def pilot_option_names() -> set[str]:
    """Every long and short option ``twistd pilot`` accepts, with its dashes."""
    options = PilotOptions(environ={})
    longs = {f"--{name.rstrip('=')}" for name in options.longOpt}
    shorts = {f"-{letter}" for letter in options.shortOpt.replace(":", "")}
    return longs | shorts


#: Code spans made only of options that belong to another program.
NOT_PILOT_SPANS = {"-c -i": "apptainer's options (Containers)"}


def bare_option_spans(text: str) -> list[str]:
    """Code spans that are options by themselves (``--lifetime``, ``-a, --workdir``), not commands."""
    spans = re.findall(r"`([^`\n]+)`", text)
    return [span for span in spans if span.startswith("-") and span not in NOT_PILOT_SPANS]


def first_screen(text: str) -> str:
    """What a reader sees before the first horizontal rule."""
    return text.split("\n---\n", 1)[0]


class ReadmeTests(SynchronousTestCase):
    def test_every_option_the_readme_names_exists(self) -> None:
        """A bare option in the README is a pilot option (the monitoring benchmark once named a bench one)."""
        known = pilot_option_names()
        unknown: list[str] = []
        for span in bare_option_spans(README):
            for word in re.split(r"[\s,/]+", span):
                name = word.split("=", 1)[0]
                if name.startswith("-") and name not in known and name not in NOT_PILOT_OPTIONS:
                    unknown.append(f"{name} (in `{span}`)")
        self.assertEqual(unknown, [])

    def test_pilot_command_lines_parse(self) -> None:
        """The README's ``twistd ... pilot ...`` examples use only options the pilot accepts."""
        known = pilot_option_names()
        blocks = "\n".join(re.findall(r"```sh\n(.*?)```", README, re.DOTALL)).replace("\\\n", " ")
        commands = re.findall(r"^twistd .*$", blocks, re.MULTILINE) + re.findall(r"`(twistd [^`]+)`", README)
        checked = 0
        for command in commands:
            words = shlex.split(command)
            if "pilot" not in words:
                continue
            checked += 1
            for word in words[words.index("pilot") + 1 :]:
                if word.startswith("-"):
                    self.assertIn(word.split("=", 1)[0], known, command)
        self.assertGreaterEqual(checked, 2)

    def test_first_screen_says_what_the_tests_need(self) -> None:
        text = " ".join(first_screen(README).split())
        self.assertIn(".ci/install-services.sh", text)
        self.assertIn("skipped on a developer's machine and fail under `CI=true`", text)

    def test_no_stale_milestone_promise(self) -> None:
        self.assertNotIn("next milestone", README)
        self.assertNotIn("later milestone", README)

    def test_daemonizing_is_explained(self) -> None:
        text = " ".join(README.split())
        self.assertIn("Always run it as `twistd --pidfile= -n pilot`", text)
        self.assertIn("Without `-n`, twistd daemonizes", text)

    def test_readme_says_which_installs_expose_the_plugin(self) -> None:
        text = " ".join(README.split())
        self.assertIn("An editable install", text)
        self.assertIn('"Unknown command: pilot"', text)


class ToxTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tox = configparser.ConfigParser(interpolation=None)
        self.tox.read(ROOT / "tox.ini")

    def test_demo_is_a_regular_install_without_test_extras(self) -> None:
        """The demo prints ``twistd -n pilot``: only a wheel install exposes that plug-in to twistd."""
        demo = self.tox["testenv:demo"]
        self.assertEqual(demo.get("package"), "wheel")
        self.assertEqual(demo.get("extras", "").strip(), "", "the demo must not install the test extras")

    def test_readme_commands_name_real_environments(self) -> None:
        environments = {
            section.split(":", 1)[1] for section in self.tox.sections() if section.startswith("testenv:")
        }
        for name in re.findall(r"tox -e (\w+)", README):
            self.assertIn(name, environments)
