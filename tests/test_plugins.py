"""Experiment plug-ins as an outside author ships them: discovery, the interface, the example.

The example of ``docs/examples/hello-vo`` is the documentation's promise that a VO can
write, package and select a plug-in without touching the pilot; these tests keep that
promise true.  They always use a temporary copy of the example, because
``getPlugins`` writes a ``dropin.cache`` next to every drop-in it reads and the
documentation tree must stay clean.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import shutil
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

import twisted.plugins
from pilot.experiments import UnknownExperiment, find_experiment, installed_experiments
from pilot.experiments.generic import GenericExperiment
from pilot.interfaces import IExperiment
from pilot.localrun import run_pilot, start_dev_server_process
from pilot.model.job import Job, parse_job
from pilot.model.processes import UtilitySpec
from pilot.queuedata import QueueData

reactor: Any = _reactor

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "hello-vo"
QUEUE = "HELLO_VO_QUEUE"

#: The utility the example documents (README, docstring of ``HelloVOExperiment.utilities``).
HEARTBEAT = UtilitySpec(
    name="heartbeat-file",
    argv=["/bin/sh", "-c", "while :; do date +%s >> hello-vo-utility.txt; sleep 1; done"],
    when="with",
    max_restarts=2,
)


def copy_example(case: SynchronousTestCase) -> Path:
    """A private copy of the example (without caches or build output) under ``case.mktemp()``."""
    root = Path(case.mktemp()).absolute()
    shutil.copytree(
        EXAMPLE,
        root,
        ignore=shutil.ignore_patterns("dropin.cache", "__pycache__", "build", "dist", "*.egg-info"),
    )
    return root


def load_example(case: SynchronousTestCase) -> Path:
    """Make a copy of the example visible to ``getPlugins`` in this process, until the test ends.

    ``twisted.plugins.__path__`` is computed once, when ``twisted.plugins`` is first
    imported, so putting the copy on ``sys.path`` is not enough: its ``twisted/plugins``
    directory is appended to ``__path__`` as well.  The cleanup undoes both and forgets
    the imported modules, so that no other test sees the example.
    """
    root = copy_example(case)
    saved_sys_path = list(sys.path)
    saved_plugin_path = list(twisted.plugins.__path__)
    sys.path.insert(0, str(root))
    twisted.plugins.__path__.append(str(root / "twisted" / "plugins"))

    def restore() -> None:
        sys.path[:] = saved_sys_path
        twisted.plugins.__path__[:] = saved_plugin_path
        for name in list(sys.modules):
            if name in ("hello_vo", "twisted.plugins.hello_vo_plugin") or name.startswith("hello_vo."):
                del sys.modules[name]
        importlib.invalidate_caches()

    case.addCleanup(restore)
    return root


def example_on_pythonpath(case: SynchronousTestCase, root: Path) -> None:
    """Put ``root`` on ``PYTHONPATH`` for child processes, until the test ends.

    ``pilot.localrun.child_environment`` starts from ``os.environ`` and prepends the
    checkout, so the twistd children find both the pilot's drop-ins and the example's.
    """
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), saved or "") if p)

    def restore() -> None:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved

    case.addCleanup(restore)


def make_job(transformation: str, job_pars: str, panda_id: int = 4242) -> Job:
    return parse_job({"PandaID": panda_id, "transformation": transformation, "jobPars": job_pars})


class DiscoveryTests(SynchronousTestCase):
    """What ``--pilot-user`` can select, found the way the pilot finds it."""

    def setUp(self) -> None:
        load_example(self)

    def test_generic_and_example_are_installed(self) -> None:
        plugins = installed_experiments()
        self.assertIn("generic", plugins)
        self.assertIn("hello-vo", plugins)
        self.assertEqual(type(plugins["hello-vo"]).__name__, "HelloVOExperiment")

    def test_every_installed_plugin_provides_the_interface(self) -> None:
        plugins = installed_experiments()
        self.assertTrue(plugins)
        for name, plugin in plugins.items():
            self.assertTrue(verifyObject(IExperiment, plugin), name)
            self.assertEqual(plugin.name, name)

    def test_unknown_name_lists_the_installed_ones(self) -> None:
        error = self.assertRaises(UnknownExperiment, find_experiment, "nope")
        message = str(error)
        self.assertNotIn("\n", message)
        self.assertIn("'nope'", message)
        self.assertIn(f"(installed: {', '.join(sorted(installed_experiments()))})", message)

    def test_example_drop_in_directories_are_not_packages(self) -> None:
        """An ``__init__.py`` there would make Twisted skip the drop-in (and shadow Twisted)."""
        self.assertFalse((EXAMPLE / "twisted" / "__init__.py").exists())
        self.assertFalse((EXAMPLE / "twisted" / "plugins" / "__init__.py").exists())


class HelloVOExperimentTests(TestCase):
    """The example's behaviour: a greeting that hostile job text cannot subvert, env, utility."""

    timeout = 30

    def setUp(self) -> None:
        load_example(self)
        self.plugin = find_experiment("hello-vo")
        self.workdir = Path(self.mktemp()).absolute()
        self.workdir.mkdir(parents=True)

    async def _run_payload(self, command: str) -> tuple[str, str, int]:
        """Run a payload command as the pilot does: ``/bin/bash -c`` in the work directory."""
        out, err, code = await getProcessOutputAndValue(
            "/bin/bash",
            ["-c", command],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            path=str(self.workdir),
            reactor=reactor,
        )
        return out.decode(), err.decode(), code

    def test_generic_command_is_one_quoted_argument(self) -> None:
        """Whatever the job's text, the wrapper keeps its shape: greeting, then ``bash -c <generic>``."""
        for transformation, job_pars in [
            ("/bin/echo", "'unbalanced ; touch injected"),
            ("/opt/my trf;touch injected", "\"a\" 'b' $(id) `id` # comment"),
            ("python3", "-c 'print(1)' && echo $HOME\nsecond line"),
        ]:
            job = make_job(transformation, job_pars)
            generic = GenericExperiment().payload_command(job, transformation, self.workdir)
            command = self.plugin.payload_command(job, transformation, self.workdir)
            self.assertEqual(
                shlex.split(command),
                ["printf", "%s\\n", "hello-vo: PandaID=4242", "&&", "exec", "/bin/bash", "-c", generic],
            )

    async def test_unbalanced_job_parameters_run_nothing(self) -> None:
        job = make_job("/bin/echo", "'unbalanced ; touch injected")
        out, err, code = await self._run_payload(self.plugin.payload_command(job, "/bin/echo", self.workdir))
        self.assertEqual(out, "hello-vo: PandaID=4242\n")
        self.assertEqual(code, 2, err)
        self.assertFalse((self.workdir / "injected").exists())

    async def test_hostile_transformation_stays_one_path(self) -> None:
        transformation = "/opt/my trf;touch injected"
        job = make_job(transformation, "")
        out, err, code = await self._run_payload(
            self.plugin.payload_command(job, transformation, self.workdir)
        )
        self.assertEqual(out, "hello-vo: PandaID=4242\n")
        self.assertEqual(code, 127, err)
        self.assertIn("/opt/my trf;touch injected", err)
        self.assertFalse((self.workdir / "injected").exists())

    async def test_job_parameters_keep_shell_semantics(self) -> None:
        """PanDA's contract: jobPars are shell text, for the example as for ``generic``."""
        job_pars = "\"a  b\" 'c;d' $((6 * 7))"
        job = make_job("/bin/echo", job_pars)
        out, err, code = await self._run_payload(self.plugin.payload_command(job, "/bin/echo", self.workdir))
        self.assertEqual((out, code), ("hello-vo: PandaID=4242\na  b c;d 42\n", 0), err)

    def test_environment_adds_hello_vo(self) -> None:
        base = {"PATH": "/usr/bin:/bin", "PANDAID": "4242"}
        env = self.plugin.payload_environment(make_job("/bin/true", ""), self.workdir, base)
        self.assertEqual(env, {**base, "HELLO_VO": "1"})
        self.assertNotIn("HELLO_VO", base)

    def test_utility_is_the_documented_heartbeat(self) -> None:
        job = make_job("/bin/true", "")
        utilities = list(self.plugin.utilities(job, QueueData.default(QUEUE), self.workdir))
        self.assertEqual(utilities, [HEARTBEAT])


def lowest_setuptools_series(pyproject: Path) -> str:
    """``setuptools~=N.0`` for the ``setuptools>=N`` the example's build-system requires."""
    requires = tomllib.loads(pyproject.read_text())["build-system"]["requires"]
    (requirement,) = [r for r in requires if r.replace(" ", "").startswith("setuptools")]
    found = re.fullmatch(r"setuptools>=(\d+)(?:\.\d+)*", requirement.replace(" ", ""))
    assert found is not None, f"build-system requires {requirement!r}: expected setuptools>=N"
    return f"setuptools~={found.group(1)}.0"


class PackagingTests(TestCase):
    """``pip wheel ./docs/examples/hello-vo`` in a clean venv: code and drop-in, nothing of Twisted.

    The build uses the oldest setuptools series the example's ``build-system.requires``
    allows, so a floor too low for its metadata (a PEP 639 license string needs 77)
    fails here instead of at a VO whose build tools are a little older.
    """

    timeout = 600  # a new venv and a download from the package index

    async def step(self, argv: list[str], cwd: Path) -> None:
        env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        env.pop("PYTHONPATH", None)
        out, err, code = await getProcessOutputAndValue(
            argv[0], argv[1:], env=env, path=str(cwd), reactor=reactor
        )
        self.assertEqual(code, 0, f"{argv}: {(out + err).decode(errors='replace')[-3000:]}")

    async def test_wheel_builds_in_a_clean_venv_with_the_oldest_allowed_setuptools(self) -> None:
        root = copy_example(self)
        venv = root.parent / "venv"
        dist = root.parent / "dist"
        await self.step([sys.executable, "-m", "venv", str(venv)], root.parent)
        python = str(venv / "bin" / "python")
        setuptools = lowest_setuptools_series(root / "pyproject.toml")
        await self.step([python, "-m", "pip", "install", "-q", setuptools, "wheel"], root.parent)
        await self.step(
            [python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(root)],
            root.parent,
        )
        (wheel,) = dist.glob("hello_vo-*.whl")
        names = set(zipfile.ZipFile(wheel).namelist())
        shipped = {name for name in names if ".dist-info/" not in name}
        self.assertEqual(shipped, {"hello_vo/__init__.py", "twisted/plugins/hello_vo_plugin.py"})
        metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA")))
        self.assertIn(b"License-Expression: Apache-2.0", metadata)
        self.assertIn(b"Requires-Dist: txpilot", metadata)


class HelloVORunTests(TestCase):
    """A real ``twistd -n pilot --pilot-user hello-vo`` against the embedded dev server (HTTPS)."""

    timeout = 180

    async def _run_job(self) -> tuple[dict[str, Any], Path]:
        """One job through the pilot with the example selected; its summary and kept work directory."""
        example_on_pythonpath(self, copy_example(self))
        run_dir = Path(self.mktemp()).absolute()
        run_dir.mkdir(parents=True)
        jobs_file = run_dir / "jobs.json"
        jobs_file.write_text(
            json.dumps(
                [
                    {
                        "computingSite": QUEUE,
                        "prodSourceLabel": "managed",
                        "jobName": "hello-vo.1",
                        "transformation": "/bin/sh",
                        # The sleep gives the ``with`` utility time to start and write.
                        "jobPars": "-c 'env > payload-env.txt; echo hello > hello_vo_1.dat; sleep 3'",
                        "outFiles": "hello_vo_1.dat,hello_vo_1.log.tgz",
                        "destinationDblock": "hello.output,hello.log",
                        "realDatasets": "hello.output,hello.log",
                        "scopeOut": "hello",
                        "logFile": "hello_vo_1.log.tgz",
                        "scopeLog": "hello",
                        "coreCount": 1,
                        "maxWalltime": 600,
                    }
                ]
            )
        )
        server = await start_dev_server_process(
            reactor, reactor, run_dir / "panda-dev", queue=QUEUE, job_files=[jobs_file]
        )
        try:
            outcome, summary = await run_pilot(
                reactor,
                reactor,
                server,
                run_dir,
                queue=QUEUE,
                extra=["--pilot-user", "hello-vo", "--keep-workdirs", "all"],
            )
        finally:
            await server.stop()
        log = (run_dir / "pilot.log").read_text(errors="replace")[-4000:]
        self.assertEqual(outcome.shell_status, 0, log)
        jobs = summary["jobs"]
        self.assertEqual([job["state"] for job in jobs], ["finished"], log)
        return jobs[0], Path(jobs[0]["workdir"])

    async def test_payload_greets_and_sees_hello_vo(self) -> None:
        job, workdir = await self._run_job()
        stdout = (workdir / "payload.stdout").read_text()
        self.assertTrue(stdout.startswith(f"hello-vo: PandaID={job['panda_id']}\n"), stdout)
        env = (workdir / "payload-env.txt").read_text().splitlines()
        self.assertIn("HELLO_VO=1", env)
        self.assertEqual((workdir / "hello_vo_1.dat").read_text(), "hello\n")
        self.assertIn("hello_vo_1.dat", job["outputs"])

    async def test_heartbeat_utility_runs_beside_the_payload(self) -> None:
        _, workdir = await self._run_job()
        heartbeat = workdir / "hello-vo-utility.txt"
        self.assertTrue(
            heartbeat.exists(),
            f"the 'heartbeat-file' utility never wrote {heartbeat} (are utilities run by the pipeline?)",
        )
        lines = heartbeat.read_text().splitlines()
        self.assertGreaterEqual(len(lines), 1)
        self.assertTrue(all(line.isdigit() for line in lines), lines)
