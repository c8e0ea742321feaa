"""``twistd panda-dev``: command-line options and the service maker.

This is the one module of the development server that imports the global
reactor; everything else receives it.

    twistd -n panda-dev --queue DEV_QUEUE --jobs jobs.json --port 0 --ready-file ready.json
"""

from __future__ import annotations

from pathlib import Path

from twisted.application.service import IService
from twisted.python import usage

from pilot.devserver.auth import TokenGrant
from pilot.devserver.queues import load_queuedata_file
from pilot.devserver.server import DevServerConfig, DevServerService


class Options(usage.Options):
    """Options of ``twistd panda-dev`` (paths are made absolute: twistd may change directory)."""

    synopsis = "[options]"
    longdesc = (
        "An embedded PanDA-compatible development server: the legacy /server/panda and the "
        "/api/v1 pilot APIs over HTTPS with a generated test PKI (CA, host certificate, user "
        "certificate and RFC 3820 proxy under STATE_DIR/pki), jobs kept in SQLite in STATE_DIR, "
        "queuedata at /cache/schedconfig/<queue>.all.json and a JSON development API under /dev/."
    )
    optParameters = [
        ["port", None, 25443, "TCP port to listen on (0 picks a free port).", int],
        ["host", None, "127.0.0.1", "Interface to listen on."],
        ["state-dir", None, "./panda-dev", "Directory for the job database and the PKI."],
        ["timefloor", None, 0, "Timefloor (minutes) of generated queuedata.", int],
        ["token-file", None, None, "File with accepted bearer tokens, one TOKEN[:VO] per line."],
        ["ready-file", None, None, "Write a JSON file with url, port and credential paths once listening."],
        ["idle-timeout", None, None, "Close connections idle this many seconds (Apache: 5).", float],
        ["files", None, None, "Directory served under /trf/ (transformations, with ETag revalidation)."],
        ["event-delay", None, 0.0, "Seconds every event-service call waits before answering.", float],
    ]
    optFlags = [
        ["plain-http", None, "Serve plain HTTP; every caller is the production user (debugging only)."],
        ["tls-sessions", None, "Let clients resume TLS sessions (as mod_ssl's session cache)."],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["jobs"] = []
        self["queues"] = []
        self["queuedata"] = []
        self["tokens"] = []
        self["production-dns"] = []

    def opt_jobs(self, path: str) -> None:
        """JSON job file (a job, a list of jobs, or {PandaID: job}); submitted once across restarts.
        Repeatable."""
        self["jobs"].append(Path(path).absolute())

    def opt_queue(self, name: str) -> None:
        """A queue served with generated queuedata. Repeatable."""
        self["queues"].append(name)

    def opt_queuedata(self, path: str) -> None:
        """Queuedata file (one queue, or {queue: queuedata}). Repeatable."""
        self["queuedata"].append(Path(path).absolute())

    def opt_token(self, grant: str) -> None:
        """An accepted bearer token, TOKEN[:VO] (a production token). Repeatable."""
        try:
            self["tokens"].append(TokenGrant.parse(grant))
        except ValueError as exc:
            raise usage.UsageError(f"--token: {exc}") from None

    def opt_production_dn(self, dn: str) -> None:
        """A DN (or DN part) with the production role; default: the generated user DN. Repeatable."""
        self["production-dns"].append(dn)

    def postOptions(self) -> None:
        if not 0 <= self["port"] <= 65535:
            raise usage.UsageError("--port must be between 0 and 65535")
        if self["timefloor"] < 0:
            raise usage.UsageError("--timefloor must not be negative")
        if self["event-delay"] < 0:
            raise usage.UsageError("--event-delay must not be negative")
        if self["token-file"]:
            try:
                lines = Path(self["token-file"]).read_text().splitlines()
                for line in lines:
                    if line.strip() and not line.lstrip().startswith("#"):
                        self["tokens"].append(TokenGrant.parse(line))
            except (OSError, ValueError) as exc:
                raise usage.UsageError(f"--token-file: {exc}") from None
        queues: dict[str, dict[str, object]] = {name: {} for name in self["queues"]}
        for path in self["queuedata"]:
            try:
                queues.update(load_queuedata_file(path))
            except ValueError as exc:
                raise usage.UsageError(str(exc)) from None
        self["queue-map"] = queues

    def config(self) -> DevServerConfig:
        ready = self["ready-file"]
        return DevServerConfig(
            state_dir=Path(self["state-dir"]).absolute(),
            port=self["port"],
            host=self["host"],
            plain_http=bool(self["plain-http"]),
            queues=self["queue-map"],
            tokens=tuple(self["tokens"]),
            production_dns=tuple(self["production-dns"]) or None,
            timefloor=self["timefloor"],
            job_files=tuple(self["jobs"]),
            ready_file=Path(ready).absolute() if ready else None,
            idle_timeout=self["idle-timeout"],
            tls_sessions=bool(self["tls-sessions"]),
            files=Path(self["files"]).absolute() if self["files"] else None,
            event_delay=self["event-delay"],
        )


def makeService(options: Options) -> IService:
    """The ``panda-dev`` service, bound to the global reactor (the only place that imports it)."""
    from twisted.internet import reactor

    return DevServerService(reactor, options.config())
