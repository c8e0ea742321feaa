"""``twistd pilot``: build the pilot service from its options.

This is the only module of the pilot that touches the global reactor: it hands the
reactor to everything else as a clock, a process spawner and a thread runner.
It also installs the pilot's signal handlers (once the reactor runs, replacing
Twisted's own SIGINT/SIGTERM handlers) and arranges for the process to exit with
the pilot's exit code, which twistd by itself would not do.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from functools import partial
from typing import Any, NoReturn

from treq.client import HTTPClient
from twisted.application.service import IService
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ReactorNotRunning
from twisted.internet.threads import deferToThreadPool
from twisted.web import client as client_module
from twisted.web.client import Agent, HTTPConnectionPool

from pilot.errors import ExitCode
from pilot.experiments import UnknownExperiment, find_experiment
from pilot.job.staging import StagingSetup
from pilot.logs import set_debug
from pilot.options import PilotOptions
from pilot.process.environment import copytool_environment
from pilot.server.client import PandaClient, TokenAuth
from pilot.server.tls import CredentialError, PilotTLSPolicy
from pilot.service import HANDLED_SIGNALS, PilotService
from pilot.staging.credentials import Credentials as StagingCredentials
from pilot.staging.storage import StorageData

Options = PilotOptions

reactor: Any = _reactor


def _fail(message: str, code: ExitCode) -> NoReturn:
    sys.stderr.write(f"pilot: error: {message}\n")
    raise SystemExit(int(code))


def _install_signal_handlers(service: PilotService) -> None:
    def handler(signum: int, frame: object) -> None:
        reactor.callFromThread(service.handle_signal, signum)

    for signum in HANDLED_SIGNALS:
        signal.signal(signum, handler)


def _exit_with_code(service: PilotService) -> None:
    """atexit hook: leave with the pilot's exit code (twistd itself always exits 0)."""
    code = service.exit_code
    if code is not None and code is not ExitCode.OK:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(code))


def makeService(options: PilotOptions) -> IService:
    config = options.config
    set_debug(config.debug)
    try:
        experiment = find_experiment(config.pilot_user)
    except UnknownExperiment as exc:
        _fail(str(exc), ExitCode.USAGE)
    credentials = config.credentials
    token = None
    if credentials.token_file is not None:
        if not credentials.token_file.is_file():
            _fail(f"token file {credentials.token_file} does not exist", ExitCode.NOPROXY)
        token = TokenAuth(credentials.token_file, credentials.auth_origin)
    try:
        policy = PilotTLSPolicy(credentials, present_proxy=token is None)
    except CredentialError as exc:
        _fail(str(exc), ExitCode.NOPROXY)
    # Twisted logs "Starting/Stopping factory" at info level for every new connection: noise
    # in the operators' log (two lines per heartbeat) and CPU for nothing.
    client_module._HTTP11ClientFactory.noisy = False
    pool = HTTPConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]
    pool.maxPersistentPerHost = 2
    # Below Apache's default KeepAliveTimeout (5 s), so we never reuse a connection the
    # server is about to close; consecutive calls of one job still share a connection.
    pool.cachedConnectionTimeout = 4
    pool.retryAutomatically = False
    agent = Agent(reactor, contextFactory=policy, pool=pool, connectTimeout=30)  # type: ignore[no-untyped-call]
    client = PandaClient(HTTPClient(agent), config.server_url, reactor, api=config.api, token=token)
    storage_policy = PilotTLSPolicy(credentials, present_proxy=False, with_system_cas=True)
    storage_pool = HTTPConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]
    storage_agent = Agent(reactor, contextFactory=storage_policy, pool=storage_pool, connectTimeout=30)  # type: ignore[no-untyped-call]
    environ = dict(os.environ)
    staging = StagingSetup(
        storage=config.storagedata or StorageData(),
        http=HTTPClient(storage_agent),
        credentials=StagingCredentials(environ),
        tool_env=copytool_environment(environ),
        parallel=config.transfer_parallelism,
        progress_interval=config.transfer_progress,
        records_dir=config.workdir,
    )
    service = PilotService(
        config,
        clock=reactor,
        spawner=reactor,
        client=client,
        experiment=experiment,
        in_thread=partial(deferToThreadPool, reactor, reactor.getThreadPool()),
        environ=environ,
        stop_reactor=lambda: reactor.callLater(0, _stop_if_running),
        close_connections=lambda: _close_pools(pool, storage_pool),
        staging=staging,
    )
    reactor.callWhenRunning(_install_signal_handlers, service)
    atexit.register(_exit_with_code, service)
    return service


def _close_pools(*pools: HTTPConnectionPool) -> Deferred[None]:
    closing = [p.closeCachedConnections() for p in pools]  # type: ignore[no-untyped-call]
    return gatherResults(closing, consumeErrors=True).addCallback(lambda _: None)


def _stop_if_running() -> None:
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass  # already stopping (twistd's own shutdown, or a second request)
