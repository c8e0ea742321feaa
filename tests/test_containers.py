"""Container runtimes: real bubblewrap sandboxes; apptainer argv, and runs through a CLI stand-in.

The bubblewrap tests run real ``bwrap`` (``.ci/install-services.sh`` installs it): like
every other tool of the tests, it skips them locally when missing and fails them in CI
(``tests.services.require_bubblewrap``).  Apptainer cannot be installed here, so its launches are
checked word for word, then run through ``tests/data/apptainer-standin``, a stand-in
that parses apptainer's ``exec`` command line and environment like apptainer does and
runs the command without isolation.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import stat
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

import psutil
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from pilot.container.apptainer import ApptainerRuntime
from pilot.container.bubblewrap import BubblewrapRuntime
from pilot.container.interfaces import IContainerRuntime
from pilot.container.registry import runtime_named, runtimes
from pilot.container.spec import SYSTEM_TREES, Bind, ContainerSpec, Launch
from pilot.process.runner import ManagedProcess

from .events import file_ready, processes_gone
from .services import require_bubblewrap

STANDIN = Path(__file__).parent / "data" / "apptainer-standin"
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"


def _executable(directory: Path, name: str, script: Path | None = None) -> Path:
    """An executable called ``name`` in ``directory``: ``script`` run by this Python, or a dud."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    body = f'exec {shlex.quote(sys.executable)} {shlex.quote(str(script))} "$@"' if script else "exit 99"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def _index(argv: Sequence[str], *words: str) -> int:
    """Where ``words`` occur together in ``argv`` (-1 if they do not)."""
    for start in range(len(argv) - len(words) + 1):
        if tuple(argv[start : start + len(words)]) == words:
            return start
    return -1


async def _run(launch: Launch, cwd: Path) -> tuple[str, str, int]:
    """Run a launch to completion: (stdout, stderr, exit code)."""
    out, err, code = await getProcessOutputAndValue(
        launch.argv[0], launch.argv[1:], env=launch.env, path=str(cwd), reactor=reactor
    )
    return out.decode(), err.decode(), code


class RegistryTests(SynchronousTestCase):
    def test_both_runtimes_provide_the_interface(self) -> None:
        for runtime in (BubblewrapRuntime(), ApptainerRuntime()):
            self.assertTrue(verifyObject(IContainerRuntime, runtime))

    def test_runtimes_by_name(self) -> None:
        known = runtimes()
        self.assertEqual(sorted(known), ["apptainer", "bubblewrap"])
        for name, runtime in known.items():
            self.assertEqual(runtime.name, name)

    def test_runtime_named_knows_the_aliases(self) -> None:
        self.assertIsInstance(runtime_named("bubblewrap"), BubblewrapRuntime)
        self.assertIsInstance(runtime_named("bwrap"), BubblewrapRuntime)
        self.assertIsInstance(runtime_named("Singularity"), ApptainerRuntime)

    def test_unknown_runtime_is_a_clear_key_error(self) -> None:
        with self.assertRaises(KeyError) as caught:
            runtime_named("docker")
        self.assertIn("unknown container runtime 'docker'", str(caught.exception))
        self.assertIn("apptainer, bubblewrap", str(caught.exception))


class _Layout:
    """A pilot directory holding a proxy, a token and the job's work directory."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.pilot = self.root / "pilot"
        self.work = self.pilot / "work" / "job-1"
        self.work.mkdir(parents=True)
        self.proxy = self.pilot / "x509up_u0"
        self.token = self.root / "tokens" / "bearer.jwt"
        self.token.parent.mkdir()
        self.secrets = {self.proxy: f"PROXY-{uuid.uuid4()}", self.token: f"TOKEN-{uuid.uuid4()}"}
        for path, secret in self.secrets.items():
            path.write_text(secret)
            path.chmod(0o600)

    @property
    def hidden(self) -> list[Path]:
        return [self.pilot, self.proxy, self.token]


class BubblewrapArgvTests(SynchronousTestCase):
    """The generated bwrap command line (a fake bwrap on PATH: no sandbox is started)."""

    def setUp(self) -> None:
        self.layout = _Layout(Path(self.mktemp()))
        self.bwrap = _executable(self.layout.root / "bin", "bwrap")
        self.environ = {"PATH": str(self.bwrap.parent)}

    def _spec(self, **overrides: object) -> ContainerSpec:
        fields: dict[str, object] = {
            "role": "payload",
            "argv": ["/bin/sh", "-c", "true"],
            "env": {"PATH": SANDBOX_PATH},
            "workdir": self.layout.work,
            "hidden": self.layout.hidden,
        }
        fields.update(overrides)
        return ContainerSpec(**fields)  # type: ignore[arg-type]

    def test_shape(self) -> None:
        launch = BubblewrapRuntime().wrap(self._spec(), self.environ)
        work = str(self.layout.work)
        self.assertEqual(launch.argv[0], str(self.bwrap))
        self.assertEqual(launch.argv[-6:], ["--chdir", work, "--", "/bin/sh", "-c", "true"])
        for words in (
            ("--die-with-parent",),
            ("--new-session",),
            ("--unshare-pid",),
            ("--unshare-ipc",),
            ("--cap-drop", "ALL"),
            ("--ro-bind", "/usr", "/usr"),
            ("--ro-bind", "/etc", "/etc"),
            ("--proc", "/proc"),
            ("--dev", "/dev"),
            ("--tmpfs", "/tmp"),
            ("--bind", work, work),
            ("--remount-ro", "/"),
        ):
            self.assertNotEqual(_index(launch.argv, *words), -1, words)
        self.assertEqual(_index(launch.argv, "--unshare-net"), -1)
        self.assertLess(_index(launch.argv, "--tmpfs", "/tmp"), _index(launch.argv, "--bind", work, work))
        self.assertEqual(launch.env, {"PATH": SANDBOX_PATH, "HOME": work})

    def test_network_off(self) -> None:
        launch = BubblewrapRuntime().wrap(self._spec(network=False), self.environ)
        self.assertNotEqual(_index(launch.argv, "--unshare-net"), -1)

    def test_hidden_pilot_directory_in_a_bound_tree_is_covered_before_the_workdir_is_bound(self) -> None:
        site = str(self.layout.root)
        runtime = BubblewrapRuntime(system_trees=(*SYSTEM_TREES, site))
        argv = runtime.wrap(self._spec(), self.environ).argv
        pilot, work, token = str(self.layout.pilot), str(self.layout.work), str(self.layout.token)
        site_bind = _index(argv, "--ro-bind", site, site)
        cover = _index(argv, "--tmpfs", pilot)
        bind = _index(argv, "--bind", work, work)
        self.assertTrue(0 < site_bind < cover < bind, argv)
        self.assertGreater(_index(argv, "--remount-ro", pilot), bind)
        self.assertNotEqual(_index(argv, "--ro-bind", "/dev/null", token), -1)
        # the proxy lies in the covered pilot directory: no cover of its own
        self.assertEqual(_index(argv, "--ro-bind", "/dev/null", str(self.layout.proxy)), -1)

    def test_hidden_file_inside_the_workdir_is_covered_after_the_workdir_bind(self) -> None:
        copy = self.layout.work / "proxy.pem"
        copy.write_text("secret")
        argv = BubblewrapRuntime().wrap(self._spec(hidden=[self.layout.pilot, copy]), self.environ).argv
        work = str(self.layout.work)
        self.assertGreater(
            _index(argv, "--ro-bind", "/dev/null", str(copy)), _index(argv, "--bind", work, work)
        )

    def test_directories_leading_to_a_workdir_in_tmp_are_read_only(self) -> None:
        top = Path("/tmp") / f"txpilot-argv-{uuid.uuid4()}"
        self.addCleanup(shutil.rmtree, top, ignore_errors=True)
        work = top / "pilot" / "work" / "job"
        work.mkdir(parents=True)
        argv = BubblewrapRuntime().wrap(self._spec(workdir=work, hidden=[top / "pilot"]), self.environ).argv
        bind = _index(argv, "--bind", str(work), str(work))
        self.assertLess(_index(argv, "--tmpfs", "/tmp"), _index(argv, "--tmpfs", str(top)))
        self.assertLess(_index(argv, "--tmpfs", str(top)), bind)
        self.assertGreater(_index(argv, "--remount-ro", str(top)), bind)
        self.assertEqual(_index(argv, "--tmpfs", str(top / "pilot")), -1, "already under the cover")

    def test_values_never_on_the_command_line(self) -> None:
        secret = f"token-{uuid.uuid4()}"
        launch = BubblewrapRuntime().wrap(self._spec(env={"BEARER_TOKEN": secret}), self.environ)
        self.assertFalse([word for word in launch.argv if secret in word])
        self.assertEqual(launch.env["BEARER_TOKEN"], secret)

    def test_refusals(self) -> None:
        runtime = BubblewrapRuntime()
        with self.assertRaises(ValueError):
            runtime.wrap(self._spec(image="docker://alpine"), self.environ)
        with self.assertRaises(ValueError):
            runtime.wrap(self._spec(hidden=[self.layout.work]), self.environ)
        with self.assertRaises(ValueError):
            runtime.wrap(self._spec(argv=[]), self.environ)
        with self.assertRaises(FileNotFoundError):
            runtime.wrap(self._spec(), {"PATH": str(self.layout.root)})
        self.assertFalse(runtime.available({"PATH": str(self.layout.root)}))

    def test_available_without_user_namespaces_when_setuid_or_root(self) -> None:
        """A setuid bwrap, or any bwrap run by root, needs no user namespaces: it is available."""
        runtime = BubblewrapRuntime()
        self.bwrap.chmod(0o4755)
        self.assertTrue(self.bwrap.stat().st_mode & stat.S_ISUID, "the file system kept the setuid bit")
        self.assertTrue(runtime.available(self.environ), "a setuid bwrap")
        self.bwrap.chmod(0o755)
        if os.geteuid() == 0:  # CI runs as root
            self.assertTrue(runtime.available(self.environ), "root")


class BubblewrapSandboxTests(TestCase):
    """Real bwrap sandboxes."""

    def setUp(self) -> None:
        require_bubblewrap()
        self.runtime = BubblewrapRuntime()
        self.layout = _Layout(Path(self.mktemp()))

    def _spec(self, script: str, **overrides: object) -> ContainerSpec:
        fields: dict[str, object] = {
            "role": "payload",
            "argv": ["/bin/sh", "-c", script],
            "env": {"PATH": SANDBOX_PATH},
            "workdir": self.layout.work,
            "hidden": self.layout.hidden,
        }
        fields.update(overrides)
        return ContainerSpec(**fields)  # type: ignore[arg-type]

    async def _sandboxed(
        self, script: str, runtime: BubblewrapRuntime | None = None, **overrides: object
    ) -> str:
        launch = (runtime or self.runtime).wrap(self._spec(script, **overrides), os.environ)
        out, err, code = await _run(launch, self.layout.root)
        self.assertEqual(code, 0, f"sandboxed script failed: {err}")
        return out

    async def test_payload_reads_input_and_writes_output_in_its_workdir(self) -> None:
        (self.layout.work / "input.txt").write_text("events: 42\n")
        out = await self._sandboxed('tr a-z A-Z < input.txt > output.txt; pwd; echo "$HOME"')
        self.assertEqual(out.split(), [str(self.layout.work)] * 2)
        self.assertEqual((self.layout.work / "output.txt").read_text(), "EVENTS: 42\n")

    async def test_hidden_proxy_and_token_are_unreadable(self) -> None:
        """Three layouts: the pilot directory unbound; inside a bound site tree; inside a system tree."""
        site = str(self.layout.root)
        layouts: list[tuple[str, BubblewrapRuntime, list[Bind]]] = [
            ("unbound", self.runtime, []),
            ("bound site", self.runtime, [Bind(self.layout.root, self.layout.root)]),
            ("system tree", BubblewrapRuntime(system_trees=(*SYSTEM_TREES, site)), []),
        ]
        (self.layout.work / "input.txt").write_text("data")
        script = (
            'for f in "$@"; do cat "$f" 2>/dev/null || echo "unreadable $f"; done; cat input.txt > copy.txt'
        )
        paths = [str(path) for path in self.layout.secrets]
        for name, runtime, binds in layouts:
            launch = runtime.wrap(
                self._spec(script, binds=binds, argv=["/bin/sh", "-c", script, "sh", *paths]), os.environ
            )
            out, err, code = await _run(launch, self.layout.root)
            self.assertEqual(code, 0, f"{name}: {err}")
            for secret in self.layout.secrets.values():
                self.assertNotIn(secret, out, name)
            self.assertEqual(out.split(), [word for path in paths for word in ("unreadable", path)], name)
            self.assertEqual((self.layout.work / "copy.txt").read_text(), "data", name)

    async def test_nothing_is_written_outside_the_workdir(self) -> None:
        name = f"txpilot-probe-{uuid.uuid4()}"
        targets = [
            Path("/etc"),
            Path("/usr"),
            Path("/opt"),
            Path("/work"),
            self.layout.pilot,
            self.layout.root,
        ]
        probes = [target / name for target in targets]
        for probe in probes:
            self.addCleanup(probe.unlink, missing_ok=True)
        script = 'for f in "$@"; do (echo x > "$f") 2>/dev/null && echo "wrote $f"; done; echo ok > inside'
        for runtime, binds in (
            (self.runtime, []),
            (self.runtime, [Bind(self.layout.root, self.layout.root)]),
            (BubblewrapRuntime(system_trees=(*SYSTEM_TREES, str(self.layout.root))), []),
        ):
            argv = ["/bin/sh", "-c", script, "sh", *map(str, probes)]
            launch = runtime.wrap(self._spec(script, binds=binds, argv=argv), os.environ)
            out, err, code = await _run(launch, self.layout.root)
            self.assertEqual(code, 0, err)
            self.assertEqual(out, "", "every write outside the workdir failed inside the sandbox")
            self.assertEqual([probe for probe in probes if probe.exists()], [], "nothing reached the host")
            self.assertEqual((self.layout.work / "inside").read_text(), "ok\n")

    async def test_tmp_is_private(self) -> None:
        planted = Path("/tmp") / f"txpilot-planted-{uuid.uuid4()}"
        written = Path("/tmp") / f"txpilot-written-{uuid.uuid4()}"
        planted.write_text("host")
        self.addCleanup(planted.unlink, missing_ok=True)
        self.addCleanup(written.unlink, missing_ok=True)
        out = await self._sandboxed(
            f"test -e {planted} && echo visible || echo absent; echo x > {written} && cat {written}; ls -A /tmp"
        )
        lines = out.splitlines()
        self.assertEqual(lines[:2], ["absent", "x"])
        self.assertNotIn(planted.name, lines[2:])
        self.assertFalse(written.exists())

    async def test_no_network_leaves_only_loopback(self) -> None:
        script = "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '"
        isolated = await self._sandboxed(script, network=False)
        self.assertEqual(isolated.split(), ["lo"])
        with open("/proc/net/dev", encoding="ascii") as host:
            interfaces = sorted(line.split(":")[0].strip() for line in host.readlines()[2:])
        self.assertEqual(sorted((await self._sandboxed(script, network=True)).split()), interfaces)

    async def test_environment_arrives_without_touching_the_command_line(self) -> None:
        secret = f"bearer-{uuid.uuid4()}"
        spec = self._spec(
            'printf %s "$PANDA_AUTH_TOKEN"', env={"PATH": SANDBOX_PATH, "PANDA_AUTH_TOKEN": secret}
        )
        launch = self.runtime.wrap(spec, os.environ)
        self.assertFalse([word for word in launch.argv if secret in word])
        out, err, code = await _run(launch, self.layout.root)
        self.assertEqual((out, code), (secret, 0), err)

    # -- killing -----------------------------------------------------------------------

    async def _start_sleeper(self) -> tuple[ManagedProcess, set[int]]:
        """A sandboxed shell with a background sleep; returns the runner and the payload's host pids."""
        marker = f"txpilot-sleeper-{uuid.uuid4()}"
        script = "sleep 1000 & echo started > started; wait"
        launch = self.runtime.wrap(self._spec(script, argv=["/bin/sh", "-c", script, marker]), os.environ)
        process = ManagedProcess(
            reactor,
            reactor,
            launch.argv,
            env=launch.env,
            cwd=self.layout.work,
            stdout=self.layout.root / "sleeper.out",
            stderr=self.layout.root / "sleeper.err",
            kill_grace=2.0,
            name="sandboxed sleeper",
        )
        process.start()
        await file_ready(self.layout.work / "started", timeout=10.0, unless=process.wait())
        shells = [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [])[:1] == ["/bin/sh"]]
        shells = [p for p in shells if marker in p.info["cmdline"]]
        self.assertEqual(len(shells), 1, "the sandboxed shell is running")
        payload = {shells[0].pid} | {child.pid for child in shells[0].children(recursive=True)}
        self.assertEqual(len(payload), 2, "shell and sleep")
        return process, payload

    async def _assert_all_gone(self, pids: set[int]) -> None:
        await processes_gone(pids, timeout=10.0)

    async def test_terminating_the_launcher_ends_the_sandboxed_payload(self) -> None:
        process, payload = await self._start_sleeper()
        outcome = await process.terminate("test")
        self.assertTrue(outcome.terminated_by_pilot)
        await self._assert_all_gone(payload)

    async def test_sigkill_to_the_process_group_alone_ends_the_payload(self) -> None:
        """No descendant tracking: --die-with-parent takes the sandbox down with bwrap."""
        process, payload = await self._start_sleeper()
        assert process.pid is not None
        os.killpg(process.pid, signal.SIGKILL)
        outcome = await process.wait()
        self.assertEqual(outcome.signal, signal.SIGKILL)
        await self._assert_all_gone(payload)


class _ApptainerFixture:
    """A host with a fake apptainer (or singularity), a work directory and an image file."""

    def __init__(self, root: Path) -> None:
        self.layout = _Layout(root)
        self.root = self.layout.root
        self.work = str(self.layout.work)
        self.cvmfs = self.root / "cvmfs"
        self.cvmfs.mkdir()
        self.image = self.root / "images" / "el9.sif"
        self.image.parent.mkdir()
        self.image.write_bytes(b"SIF")
        self.apptainer = _executable(self.root / "bin", "apptainer")
        self.singularity = _executable(self.root / "sbin", "singularity")

    def spec(self, **overrides: object) -> ContainerSpec:
        fields: dict[str, object] = {
            "role": "payload",
            "argv": ["/bin/sh", "-c", "./run.sh --events 10"],
            "env": {"PATH": "/usr/bin:/bin", "HOME": "/home/pilot", "PanDA_TaskID": "42"},
            "workdir": self.layout.work,
            "image": "docker://ghcr.io/example/analysis:1.0",
        }
        fields.update(overrides)
        return ContainerSpec(**fields)  # type: ignore[arg-type]


class ApptainerArgvTests(SynchronousTestCase):
    """The exact ``apptainer exec`` command lines."""

    def setUp(self) -> None:
        self.host = _ApptainerFixture(Path(self.mktemp()))
        self.environ = {"PATH": str(self.host.apptainer.parent)}
        self.with_cvmfs = ApptainerRuntime(cvmfs=str(self.host.cvmfs))
        self.without_cvmfs = ApptainerRuntime(cvmfs=str(self.host.root / "no-cvmfs"))

    def test_argv_matrix(self) -> None:
        host, work = self.host, self.host.work
        payload = ["/bin/sh", "-c", "./run.sh --events 10"]
        docker = "docker://ghcr.io/example/analysis:1.0"
        head = [str(host.apptainer), "exec", "--cleanenv", "--pwd", work]
        data, scratch, cache = (host.root / name for name in ("data", "scratch", "cache"))
        cases: list[tuple[str, ApptainerRuntime, dict[str, object], list[str]]] = [
            (
                "no queue options: pilot3's -c -i",
                self.without_cvmfs,
                {},
                [*head, "--contain", "--ipc", "-B", work, docker, *payload],
            ),
            (
                "CRIC 'None' means no options",
                self.without_cvmfs,
                {"options": "None"},
                [*head, "--contain", "--ipc", "-B", work, docker, *payload],
            ),
            (
                "pilot3 catchall form binds workdir and /cvmfs itself",
                self.with_cvmfs,
                {"options": f"-B /etc/grid-security/certificates,{host.cvmfs},${{workdir}} --contain"},
                [
                    *head,
                    "-B",
                    f"/etc/grid-security/certificates,{host.cvmfs},{work}",
                    "--contain",
                    docker,
                    *payload,
                ],
            ),
            (
                "workdir missing from the queue's binds is added",
                self.without_cvmfs,
                {"options": "-B /etc/grid-security/certificates --contain"},
                [*head, "-B", "/etc/grid-security/certificates", "--contain", "-B", work, docker, *payload],
            ),
            (
                "workdir bound elsewhere still gets its own bind",
                self.without_cvmfs,
                {"options": "-B ${workdir}:/srv -c"},
                [*head, "-B", f"{work}:/srv", "-c", "-B", work, docker, *payload],
            ),
            (
                "short switches, /cvmfs on the host",
                self.with_cvmfs,
                {"options": "-c -i -p"},
                [*head, "-c", "-i", "-p", "-B", work, "-B", str(host.cvmfs), docker, *payload],
            ),
            (
                "clusters split, duplicates and our own options dropped",
                self.without_cvmfs,
                {"options": "-ci --contain -e --cleanenv --ipc -B /a -B /a,/b --bind=/b --pwd=/srv"},
                [*head, "-c", "-i", "-B", "/a", "-B", "/b", "-B", work, docker, *payload],
            ),
            (
                "repeated binds merged per specification, bind options kept with theirs",
                self.without_cvmfs,
                {"options": "-B /a:/a:ro,/b -B /b,/c:/c:rw -c"},
                [*head, "-B", "/a:/a:ro,/b", "-B", "/c:/c:rw", "-c", "-B", work, docker, *payload],
            ),
            (
                "value forms normalised, other options kept in order",
                self.without_cvmfs,
                {"options": "--home=/tmp/h --writable-tmpfs --contain=true -W /scratch"},
                [
                    *head,
                    "--home",
                    "/tmp/h",
                    "--writable-tmpfs",
                    "--contain=true",
                    "-W",
                    "/scratch",
                    "-B",
                    work,
                ]
                + [docker, *payload],
            ),
            (
                "binds read-only and read-write, image from a path",
                self.with_cvmfs,
                {
                    "options": "--containall",
                    "image": str(host.image),
                    "binds": [
                        Bind(data, data, read_only=True),
                        Bind(scratch, Path("/scratch"), read_only=False),
                        Bind(cache, cache, read_only=False),
                    ],
                },
                [*head, "--containall", "-B", work, "-B", str(host.cvmfs), "-B", f"{data}:{data}:ro"]
                + ["-B", f"{scratch}:/scratch", "-B", str(cache), str(host.image), *payload],
            ),
            (
                "no network overrides the queue's network",
                self.without_cvmfs,
                {"options": "--net --network bridge --dns 8.8.8.8 -c", "network": False},
                [*head, "-c", "-B", work, "--net", "--network", "none", docker, *payload],
            ),
            (
                "hidden paths and no containment: --contain added",
                self.without_cvmfs,
                {"options": "-i -p", "hidden": self.host.layout.hidden},
                [*head, "-i", "-p", "--contain", "-B", work, docker, *payload],
            ),
            (
                "oras image, defaults with hidden paths",
                self.without_cvmfs,
                {"image": "oras://registry.example/img:2", "hidden": self.host.layout.hidden},
                [*head, "--contain", "--ipc", "-B", work, "oras://registry.example/img:2", *payload],
            ),
        ]
        for name, runtime, overrides, expected in cases:
            self.assertEqual(runtime.wrap(host.spec(**overrides), self.environ).argv, expected, name)

    def test_singularity_only_host(self) -> None:
        environ = {"PATH": str(self.host.singularity.parent)}
        launch = self.without_cvmfs.wrap(self.host.spec(options="-c -i"), environ)
        work = self.host.work
        self.assertEqual(
            launch.argv,
            [str(self.host.singularity), "exec", "--cleanenv", "--pwd", work, "-c", "-i", "-B", work]
            + ["docker://ghcr.io/example/analysis:1.0", "/bin/sh", "-c", "./run.sh --events 10"],
        )
        self.assertEqual(launch.env["SINGULARITYENV_PanDA_TaskID"], "42")
        self.assertEqual(launch.env["APPTAINERENV_PanDA_TaskID"], "42")

    def test_apptainer_preferred_over_singularity(self) -> None:
        environ = {"PATH": f"{self.host.singularity.parent}:{self.host.apptainer.parent}"}
        self.assertEqual(self.without_cvmfs.executable(environ), str(self.host.apptainer))
        self.assertTrue(self.without_cvmfs.available(environ))
        self.assertFalse(self.without_cvmfs.available({"PATH": str(self.host.root)}))

    def test_environment_passes_as_apptainerenv_only(self) -> None:
        secret = f"bearer-{uuid.uuid4()}"
        environ = {
            **self.environ,
            "HOME": "/home/pilot",
            "https_proxy": "http://squid:3128",
            "APPTAINER_CACHEDIR": "/scratch/cache",
            "APPTAINER_BIND": "/from/an/outer/container",
            "APPTAINERENV_LEFTOVER": "site",
            "X509_USER_PROXY": "/pilot/x509up",
            "PILOT_ONLY": "1",
        }
        env = {"PATH": "/usr/bin", "HOME": "/w", "LD_LIBRARY_PATH": "/lib", "TOKEN": secret, "TZ": "UTC"}
        launch = self.without_cvmfs.wrap(self.host.spec(env=env), environ)
        self.assertFalse([word for word in launch.argv if secret in word])
        self.assertEqual(
            launch.env,
            {
                "PATH": str(self.host.apptainer.parent),
                "HOME": "/home/pilot",
                "https_proxy": "http://squid:3128",
                "APPTAINER_CACHEDIR": "/scratch/cache",
                "APPTAINERENV_TOKEN": secret,
                "APPTAINERENV_TZ": "UTC",
            },
        )

    def test_refusals(self) -> None:
        runtime, host = self.without_cvmfs, self.host
        refused: list[tuple[str, dict[str, object]]] = [
            ("no image", {"image": None}),
            ("missing image file", {"image": str(host.root / "missing.sif")}),
            ("image read as an option", {"image": "--help"}),
            ("hidden path under a queue bind", {"options": f"-B {host.root}", "hidden": [host.layout.proxy]}),
            (
                "hidden path under a spec bind",
                {"binds": [Bind(host.root, host.root)], "hidden": [host.layout.token]},
            ),
            ("'--' in the options", {"options": "-c -- -i"}),
            ("unbalanced quote", {"options": "-B '/a"}),
            ("option without its value", {"options": "-c --bind"}),
            ("comma in a bind path", {"binds": [Bind(Path("/a,b"), Path("/a,b"))]}),
            ("empty argv", {"argv": []}),
        ]
        for name, overrides in refused:
            with self.assertRaises(ValueError, msg=name):
                runtime.wrap(host.spec(**overrides), self.environ)
        with self.assertRaises(FileNotFoundError):
            runtime.wrap(host.spec(), {"PATH": str(host.root)})


class ApptainerStandinTests(TestCase):
    """Generated launches run through the apptainer CLI stand-in."""

    def setUp(self) -> None:
        self.host = _ApptainerFixture(Path(self.mktemp()))
        self.bin = self.host.root / "standin-bin"
        self.apptainer = _executable(self.bin, "apptainer", STANDIN)
        self.environ = {
            "PATH": f"{self.bin}:{os.environ.get('PATH', os.defpath)}",
            "HOME": str(self.host.root),
            "PILOT_ONLY": "must not reach the payload",
            "X509_USER_PROXY": str(self.host.layout.proxy),
        }
        self.runtime = ApptainerRuntime(cvmfs=str(self.host.cvmfs))

    async def _launch(self, **overrides: object) -> tuple[Launch, tuple[str, str, int]]:
        launch = self.runtime.wrap(self.host.spec(**overrides), self.environ)
        self.assertEqual(launch.argv[0], str(self.apptainer))
        return launch, await _run(launch, self.host.root)

    async def test_workdir_and_clean_environment(self) -> None:
        secret = f"bearer-{uuid.uuid4()}"
        for image in ("docker://ghcr.io/example/analysis:1.0", str(self.host.image)):
            _, (out, err, code) = await self._launch(
                argv=["/bin/sh", "-c", "pwd; env"],
                env={"PATH": "/usr/bin:/bin", "BEARER_TOKEN": secret, "PanDA_TaskID": "42"},
                image=image,
                hidden=self.host.layout.hidden,
            )
            self.assertEqual(code, 0, err)
            lines = out.splitlines()
            self.assertEqual(lines[0], self.host.work)
            env = dict(line.split("=", 1) for line in lines[1:] if "=" in line)
            self.assertEqual(env["BEARER_TOKEN"], secret)
            self.assertEqual(env["PanDA_TaskID"], "42")
            self.assertEqual(env["LANG"], "C")
            self.assertEqual(env["APPTAINER_CONTAINER"], image)
            self.assertEqual(env["PATH"], "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            for name in ("PILOT_ONLY", "X509_USER_PROXY"):
                self.assertNotIn(name, env)
            self.assertFalse([key for key in env if key.startswith(("APPTAINERENV_", "SINGULARITYENV_"))])

    async def test_bind_lists_and_repeated_binds(self) -> None:
        (self.host.layout.work / "marker").write_text("bound")
        _, (out, err, code) = await self._launch(
            argv=["/bin/sh", "-c", 'echo "$APPTAINER_BIND"; cat marker'],
            options="-B /usr,/etc -B /usr/share:/usr/share:ro --bind=/tmp -c -i",
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(
            out.splitlines(),
            [f"/usr,/etc,/usr/share,/tmp,{self.host.work},{self.host.cvmfs}", "bound"],
        )

    async def test_unknown_option_is_rejected(self) -> None:
        _, (out, err, code) = await self._launch(options="--contain --no-such-option")
        self.assertEqual(code, 1)
        self.assertIn('Error for command "exec": unknown flag: --no-such-option', err)

    async def test_missing_bind_source_is_fatal(self) -> None:
        missing = self.host.root / "missing"
        _, (out, err, code) = await self._launch(binds=[Bind(missing, missing)])
        self.assertEqual(code, 255)
        self.assertIn(f"mount source {missing} doesn't exist", err)

    async def test_exit_status_of_the_payload(self) -> None:
        _, (out, err, code) = await self._launch(argv=["/bin/sh", "-c", "exit 7"])
        self.assertEqual(code, 7, err)
