"""What a payload with the pilot's uid can read of the pilot through ``/proc``.

Defect 10 of issue 11: a payload run without a container read the pilot's environment
and command line through ``/proc/$PPID/``.  These tests run a stand-in pilot
(``tests/data/hardening_child.py``) as an unprivileged uid (``setpriv`` when the tests
run as root, as here and in CI) and a payload, its child with the same uid, that reads
``/proc/<stand-in>/environ`` and ``cmdline``; the control runs show that the payload
does read them when the stand-in does nothing, so the tests can fail.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

import pilot
import pilot.util.hardening
import pilot.util.secrets
from pilot.util.hardening import hide_argv_values, make_undumpable, scrub_environment

from .services import missing, require_tool

reactor: Any = _reactor
CHILD = Path(__file__).parent / "data" / "hardening_child.py"
#: The uid and gid of ``nobody`` on Debian.
NOBODY = 65534
SECRET = "s3-secret-0123456789abcdefghijklmnopqrstuv"
PROXY_PATH = "/tmp/x509up_u4242"


def _others_may_run(path: Path) -> bool:
    """Whether a uid other than the owner may execute ``path`` (and reach it)."""
    path = path.resolve()
    try:
        return all(os.stat(p).st_mode & stat.S_IXOTH for p in (path, *path.parents))
    except OSError:
        return False


def python_for_nobody() -> str | None:
    """An interpreter that an unprivileged uid can run (with its standard library)."""
    candidates = [Path(sys.executable)] if _others_may_run(Path(sys.base_prefix) / "lib") else []
    candidates += [Path("/usr/bin/python3"), Path("/usr/local/bin/python3")]
    for candidate in candidates:
        if candidate.exists() and _others_may_run(candidate):
            return str(candidate)
    return None


def stand_in_directory() -> Path:
    """The stand-in and the modules it imports, where an unprivileged uid can read them."""
    directory = Path(tempfile.mkdtemp(prefix="txpilot-hardening-"))
    (directory / "pilot" / "util").mkdir(parents=True)
    shutil.copy(CHILD, directory / "child.py")
    for module in (pilot, pilot.util.hardening, pilot.util.secrets):
        assert module.__file__ is not None
        target = directory / Path(*module.__name__.split(".")).with_suffix(".py")
        if module is pilot:
            target = directory / "pilot" / "__init__.py"
        shutil.copy(module.__file__, target)
    (directory / "pilot" / "util" / "__init__.py").touch()
    for path in (directory, *directory.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return directory


class PayloadReadsThePilotTests(TestCase):
    """The stand-in runs as ``nobody``; its payload is its child with the same uid."""

    timeout = 60

    def setUp(self) -> None:
        if os.geteuid() == 0:
            self.prefix = [
                require_tool("setpriv"),
                f"--reuid={NOBODY}",
                f"--regid={NOBODY}",
                "--clear-groups",
            ]
            python = python_for_nobody()
            if python is None:
                missing(f"a Python interpreter that uid {NOBODY} may run (/usr/bin/python3)")
            assert python is not None
            self.python = python
        else:  # already unprivileged: the property holds for any uid without CAP_SYS_PTRACE
            self.prefix, self.python = [], sys.executable
        self.directory = stand_in_directory()
        self.addCleanup(shutil.rmtree, self.directory)

    async def run_stand_in(self, mode: str, *extra: str, **environ: str) -> dict[str, Any]:
        argv = [*self.prefix, self.python, str(self.directory / "child.py"), mode, *extra]
        env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", **environ}
        out, err, code = await getProcessOutputAndValue(
            argv[0], argv[1:], env=env, path=str(self.directory), reactor=reactor
        )
        self.assertEqual(code, 0, err.decode(errors="replace"))
        result: dict[str, Any] = json.loads(out)
        if os.geteuid() == 0:
            self.assertEqual(result["uid"], NOBODY)
        return result

    async def test_payload_cannot_read_an_undumpable_pilots_environment(self) -> None:
        result = await self.run_stand_in("undumpable", AWS_SECRET_ACCESS_KEY=SECRET)
        self.assertIsNone(result["undumpable"])
        self.assertIs(result["dumpable"], False)
        self.assertIn(result["payload"]["environ"], (errno.EACCES, errno.EPERM))
        # what stays readable to everyone (docs/security.md): the command line
        self.assertIn("child.py", result["payload"]["cmdline"])

    async def test_payload_reads_an_ordinary_pilots_environment_and_command_line(self) -> None:
        """The control: without the measures, both are there for the payload to read."""
        result = await self.run_stand_in("plain", f"--password={SECRET}", AWS_SECRET_ACCESS_KEY=SECRET)
        self.assertIs(result["dumpable"], True)
        self.assertIn(f"AWS_SECRET_ACCESS_KEY={SECRET}", result["payload"]["environ"])
        self.assertIn(SECRET, result["payload"]["cmdline"])

    async def test_scrubbed_variables_leave_proc_environ(self) -> None:
        result = await self.run_stand_in(
            "scrub", AWS_SECRET_ACCESS_KEY=SECRET, X509_USER_PROXY=PROXY_PATH, SITE_MARKER="kept-variable"
        )
        self.assertEqual(result["removed"], ["AWS_SECRET_ACCESS_KEY", "X509_USER_PROXY"])
        environ = result["payload"]["environ"]
        self.assertNotIn(SECRET, environ)
        self.assertNotIn(PROXY_PATH, environ)
        self.assertNotIn("AWS_SECRET_ACCESS_KEY", environ)
        self.assertIn("SITE_MARKER=kept-variable", environ)
        self.assertEqual(result["libc_path"], "/usr/bin:/bin")  # the C library's environ intact

    async def test_removing_from_os_environ_alone_leaves_the_value_in_proc(self) -> None:
        """Why ``scrub_environment`` rewrites the environment block: ``unsetenv`` is not enough."""
        result = await self.run_stand_in("pop", AWS_SECRET_ACCESS_KEY=SECRET)
        self.assertIn(SECRET, result["payload"]["environ"])

    async def test_argv_values_are_hidden_from_cmdline(self) -> None:
        result = await self.run_stand_in("argv", f"--password={SECRET}", "--queue=Q", HIDE_ME=SECRET)
        self.assertEqual(result["hidden"], 1)
        cmdline = result["payload"]["cmdline"].split("\0")
        self.assertIn("--password=" + "*" * len(SECRET), cmdline)
        self.assertIn("--queue=Q", cmdline)
        self.assertNotIn(SECRET, result["payload"]["cmdline"])
        self.assertEqual(result["argv"], [f"--password={SECRET}", "--queue=Q"])  # sys.argv unchanged


class ScrubLogicTests(SynchronousTestCase):
    def test_credential_variables_are_removed_and_returned(self) -> None:
        environ = {
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "aws_session_token": "t" * 20,
            "BEARER_TOKEN_FILE": "/run/token",
            "PANDA_AUTH_TOKEN": "panda_token",
            "X509_USER_PROXY": PROXY_PATH,
            "DB_PASSWORD": "hunter2hunter2",
            "PATH": "/usr/bin",
            "X509_CERT_DIR": "/etc/grid-security/certificates",
            "HOME": "/home/pilot",
        }
        removed = scrub_environment(environ)
        self.assertEqual(set(environ), {"PATH", "X509_CERT_DIR", "HOME"})
        self.assertEqual(removed["AWS_SECRET_ACCESS_KEY"], SECRET)
        self.assertEqual(len(removed), 6)

    def test_names_can_be_given(self) -> None:
        environ = {"SITE_KEY_A": "x" * 10, "OTHER": "y"}
        self.assertEqual(scrub_environment(environ, ["site_key_*"]), {"SITE_KEY_A": "x" * 10})
        self.assertEqual(environ, {"OTHER": "y"})

    def test_elsewhere_than_linux_a_reason_and_no_rewrite(self) -> None:
        self.patch(sys, "platform", "darwin")
        reason = make_undumpable()
        self.assertIsNotNone(reason)
        assert reason is not None
        self.assertIn("Linux-only", reason)
        self.assertEqual(hide_argv_values([sys.argv[0]]), 0)
