"""``twistd pilot``: build the pilot service from its options.

This is the only module of the pilot that touches the global reactor: it hands the
reactor to everything else as a clock, a process spawner and a thread runner.  Before
anything else it hardens the process: the pilot becomes undumpable (other processes of
its uid cannot read its ``/proc`` environment or memory), credential variables leave
its environment (also the block ``/proc/<pid>/environ`` shows), every secret value it
knows is registered for redaction, and its own clients use private copies of its
proxy and tokens (``docs/security.md``).

It also installs the pilot's signal handlers (once the reactor runs, replacing
Twisted's own SIGINT/SIGTERM handlers) and applies the pilot's exit code when the
process ends.  twistd has no way to set a process's exit status (twisted/twisted#11335,
open since 2004): the service tree only records it (``PilotService.exit_code``), and
this module, the application's edge, ends the process with it after twistd's own
shutdown (pid file removed, logs stopped) is complete.
"""

# ruff: noqa: E402 (the imports follow gc.freeze() on purpose)
from __future__ import annotations

import atexit
import gc
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

# What exists now (Python, Twisted, twistd's options) lives as long as the process, and
# so does what the pilot's imports below create (modules, classes, functions): the
# collector, which would walk it all several times while they run (a full collection
# alone costs 10-20 ms), is kept out of the way until they are done; then the garbage
# they left is collected once and the rest frozen too.
gc.freeze()
gc.disable()

from twisted.application.service import IService
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

from pilot.config import PilotConfig
from pilot.errors import ExitCode, PilotError
from pilot.experiments import UnknownExperiment, find_experiment
from pilot.job.staging import StagingSetup
from pilot.logs import pilot_observer, set_debug
from pilot.model.credentials import Credentials
from pilot.options import PilotOptions
from pilot.process.environment import copytool_environment
from pilot.server.client import PandaClient, TokenAuth
from pilot.server.connection import ServerConnection
from pilot.server.tls import CredentialError, PilotTLSPolicy
from pilot.service import HANDLED_SIGNALS, PilotService
from pilot.service.credentials import CredentialRefresh
from pilot.service.jobloop import make_pilot_dir
from pilot.service.pools import BLOCKING_THREADS, CHECKSUM_THREADS, PoolService
from pilot.source.modes import file_exchange
from pilot.staging.credentials import Credentials as StagingCredentials
from pilot.staging.storage import StorageData
from pilot.util.hardening import hide_argv_values, make_undumpable, scrub_environment
from pilot.util.private import CREDENTIALS_DIR, PrivateAreaError, PrivateCredentials
from pilot.util.resolver import PoolResolver
from pilot.util.secrets import SecretValues
from pilot.util.threads import WorkerPool

gc.collect()
gc.freeze()
gc.enable()

Options = PilotOptions

reactor: Any = _reactor
log = Logger(observer=pilot_observer)

#: Seconds an idle server connection is kept (the server may close it sooner: a call on a
#: connection it closed is repeated at once on a new one, with a resumed TLS session).
SERVER_IDLE_TIMEOUT = 60.0
CONNECT_TIMEOUT = 30.0


def _fail(message: str, code: ExitCode) -> NoReturn:
    sys.stderr.write(f"pilot: error: {message}\n")
    raise SystemExit(int(code))


def _install_signal_handlers(service: PilotService) -> None:
    def handler(signum: int, frame: object) -> None:
        reactor.callFromThread(service.handle_signal, signum)

    for signum in HANDLED_SIGNALS:
        signal.signal(signum, handler)


def _exit_with_code(service: PilotService) -> None:
    """atexit hook: leave with the pilot's exit code (see the module docstring)."""
    code = service.exit_code
    if code is not None and code is not ExitCode.OK:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(code))


def _harden(config: PilotConfig) -> tuple[dict[str, str], SecretValues]:
    """The pilot's environment (as it was) and every secret value in it; the process hardened."""
    reason = make_undumpable()
    if reason is not None:
        log.warn("the pilot's /proc entries stay readable by its uid: {reason}", reason=reason)
    environ = dict(os.environ)
    scrub_environment(os.environ)
    secrets = SecretValues()
    secrets.add_environment(environ)
    token_file = config.credentials.token_file
    if token_file is not None and token_file.is_file():
        secrets.add_file(token_file)
    hide_argv_values(secrets.values())
    return environ, secrets


def _private_copies(config: PilotConfig, pilot_dir: Path, environ: dict[str, str]) -> PrivateCredentials:
    """The pilot's proxy and tokens, copied where only the pilot's uid can read them."""
    credentials = config.credentials
    sources = {"proxy": credentials.proxy, "token": credentials.token_file}
    bearer = environ.get("BEARER_TOKEN_FILE")
    if bearer:
        sources["bearer"] = Path(bearer)
    private = PrivateCredentials(
        pilot_dir / CREDENTIALS_DIR, {name: path for name, path in sources.items() if path is not None}
    )
    try:
        private.refresh()
    except (OSError, PrivateAreaError) as exc:
        _fail(f"cannot copy the pilot's credentials: {exc}", ExitCode.NOPROXY)
    return private


def makeService(options: PilotOptions) -> IService:
    config = options.config
    set_debug(config.debug)
    try:
        experiment = find_experiment(config.pilot_user)
    except UnknownExperiment as exc:
        _fail(str(exc), ExitCode.USAGE)
    if config.credentials.token_file is not None and not config.credentials.token_file.is_file():
        _fail(f"token file {config.credentials.token_file} does not exist", ExitCode.NOPROXY)
    environ, secrets = _harden(config)
    try:
        pilot_dir = make_pilot_dir(config.workdir.absolute(), reactor.seconds(), config.modes.directory)
    except PilotError as exc:
        _fail(exc.diag, ExitCode.MKDIR)
    private = _private_copies(config, pilot_dir, environ)
    copies = private.paths
    # the pilot's own clients use the copies; config.credentials keeps the site's paths,
    # which payload containers hide
    own = Credentials(
        cacert=config.credentials.cacert,
        capath=config.credentials.capath,
        proxy=copies.get("proxy"),
        token_file=copies.get("token"),
        auth_origin=config.credentials.auth_origin,
    )
    token = TokenAuth(own.token_file, own.auth_origin) if own.token_file is not None else None
    offline = config.harvester.offline
    try:
        # in a file mode no connection is made: a missing proxy is no reason to stop
        policy = PilotTLSPolicy(own, present_proxy=token is None and not offline)
    except CredentialError as exc:
        _fail(str(exc), ExitCode.NOPROXY)
    server = ServerConnection(
        reactor, policy, idle_timeout=SERVER_IDLE_TIMEOUT, connect_timeout=CONNECT_TIMEOUT
    )
    client = PandaClient(
        server.http, config.server_url, reactor, api=config.api, token=token, connection=server
    )
    storage = ServerConnection(
        reactor,
        PilotTLSPolicy(own, present_proxy=False, with_system_cas=True),
        connect_timeout=CONNECT_TIMEOUT,
    )
    # the pilot's own pools: the reactor's default pool never holds the pilot's work
    blocking = WorkerPool(reactor, BLOCKING_THREADS, "pilot-blocking")
    checksums = WorkerPool(reactor, CHECKSUM_THREADS, "pilot-checksums")
    in_thread = blocking.runner
    # server names are resolved in the pilot's own pool: no thread of the reactor's pool
    reactor.installNameResolver(PoolResolver(in_thread))
    exchange = file_exchange(
        config.harvester,
        config.workdir.absolute(),
        clock=reactor,
        in_thread=in_thread,
        file_mode=config.modes.file,
    )
    storage_data = config.storagedata or StorageData()
    if exchange is not None and exchange.source is not None:
        storage_data = StorageData({**storage_data.endpoints, **exchange.storage.endpoints})
    staging = StagingSetup(
        storage=storage_data,
        http=storage.http,
        credentials=StagingCredentials(environ, secrets=secrets),
        tool_env=copytool_environment(environ, proxy=own.proxy, token_file=copies.get("bearer")),
        parallel=config.transfer_parallelism,
        progress_interval=config.transfer_progress,
        records_dir=config.workdir,
        checksum_runner=checksums.runner,
    )
    service = PilotService(
        config,
        clock=reactor,
        spawner=reactor,
        client=client,
        experiment=experiment,
        in_thread=in_thread,
        environ=environ,
        stop_reactor=lambda: reactor.callLater(0, _stop_if_running),
        close_connections=lambda: _close(server, storage),
        staging=staging,
        secrets=secrets,
        pilot_dir=pilot_dir,
        # started in this order before the job loop, stopped in reverse after it
        helpers=[
            PoolService(blocking),
            PoolService(checksums),
            CredentialRefresh(private, reactor, in_thread),
            *([exchange.worker] if exchange is not None and exchange.worker is not None else []),
        ],
        source=exchange.source if exchange is not None else None,
        reporter=exchange.source if exchange is not None else None,
        adjust_queuedata=exchange.adjust_queuedata if exchange is not None and exchange.source else None,
    )
    reactor.callWhenRunning(_install_signal_handlers, service)
    atexit.register(_exit_with_code, service)
    # Everything made so far (modules, classes, functions: most of the process's objects)
    # lives as long as the pilot: moved out of the collector's way, so that each full
    # collection during the jobs walks only what the jobs made.
    gc.freeze()
    return service


def _close(*connections: ServerConnection) -> Deferred[None]:
    closing = [c.close() for c in connections]
    return gatherResults(closing, consumeErrors=True).addCallback(lambda _: None)


def _stop_if_running() -> None:
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass  # already stopping (twistd's own shutdown, or a second request)
