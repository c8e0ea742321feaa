"""``twistd pilot`` command line, config file merging, and start-up validation.

Option names follow the reference pilot (pilot3) where it has one, so site wrapper
scripts can switch pilots without rewriting their command lines.  Every option can
also be set in a TOML config file (``--config``, section ``[pilot]``, keys are the
long option names); the command line wins over the file, the file over defaults.

A bad option, a bad config file or an unusable queuedata *file* ends the pilot
before it starts, with one line on stderr and a documented exit code
(``ExitCode.USAGE``, ``QUEUEDATA``, ``QUEUEDATANOTOK``): a batch log full of usage
text helps nobody.
"""

from __future__ import annotations

import os
import socket
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

from twisted.python import usage

from pilot import __version__
from pilot.config import KeepWorkdirs, PilotConfig
from pilot.errors import ExitCode, PilotError, exit_code_for
from pilot.model.credentials import Credentials
from pilot.monitor.settings import MonitorSettings
from pilot.queuedata import QueueData, is_url, load_queuedata_file
from pilot.server.api import ApiMode
from pilot.staging.storage import StorageData

DEFAULT_URL = "https://pandaserver.cern.ch"
DEFAULT_PORT = 25443


class ConfigError(Exception):
    """A setting is unusable; the message is the one line the operator sees."""

    def __init__(self, message: str, exit_code: ExitCode = ExitCode.USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _positive_float(name: str) -> Callable[[object], float]:
    def convert(value: object) -> float:
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ConfigError(f"--{name}: expected a number of seconds, got {value!r}") from None
        if number <= 0:
            raise ConfigError(f"--{name}: must be positive, got {value!r}")
        return number

    return convert


def _nonnegative_int(name: str) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, bool):
            raise ConfigError(f"--{name}: expected a whole number, got {value!r}")
        try:
            number = int(str(value))
        except ValueError:
            raise ConfigError(f"--{name}: expected a whole number, got {value!r}") from None
        if number < 0:
            raise ConfigError(f"--{name}: must not be negative, got {value!r}")
        return number

    return convert


def _text(name: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"--{name}: expected text, got {value!r}")
        return str(value)

    return convert


def _choice(name: str, choices: tuple[str, ...]) -> Callable[[object], str]:
    def convert(value: object) -> str:
        text = str(value)
        if text not in choices:
            raise ConfigError(f"--{name}: expected one of {', '.join(choices)}, got {value!r}")
        return text

    return convert


@dataclass(frozen=True)
class _Setting:
    """One option: its long name, short name, default, help text and converter."""

    name: str
    short: str | None
    default: object
    doc: str
    convert: Callable[[object], object]


_SETTINGS: tuple[_Setting, ...] = (
    _Setting("queue", "q", None, "PanDA queue to take jobs for (required).", _text("queue")),
    _Setting("url", None, DEFAULT_URL, "PanDA server URL (https).", _text("url")),
    _Setting("port", "p", DEFAULT_PORT, "PanDA server port, if --url has none.", _nonnegative_int("port")),
    _Setting("pilot-user", None, "generic", "Experiment plug-in name.", _text("pilot-user")),
    _Setting(
        "job-label",
        "j",
        "ptest",
        "prodSourceLabel to ask jobs for (managed, user, test, ptest...).",
        _text("job-label"),
    ),
    _Setting("lifetime", "l", 324000.0, "Pilot lifetime in seconds.", _positive_float("lifetime")),
    _Setting(
        "workdir",
        "a",
        None,
        "Base directory for the pilot's work directory (default: cwd).",
        _text("workdir"),
    ),
    _Setting(
        "resource-type", None, "", "Resource type to ask for (SCORE, MCORE, ...).", _text("resource-type")
    ),
    _Setting(
        "getjob-requests",
        "v",
        2,
        "Consecutive job requests without a job before the pilot ends.",
        _nonnegative_int("getjob-requests"),
    ),
    _Setting(
        "getjob-failures",
        "x",
        5,
        "Consecutive failed job requests before the pilot ends.",
        _nonnegative_int("getjob-failures"),
    ),
    _Setting(
        "cacert", None, None, "CA certificate bundle (PEM) for the server's certificate.", _text("cacert")
    ),
    _Setting(
        "capath",
        None,
        None,
        "CA directory (hashed) for the server's certificate; default $X509_CERT_DIR.",
        _text("capath"),
    ),
    _Setting(
        "api",
        None,
        "auto",
        "Server API generation: v1, legacy or auto (v1, falling back to legacy).",
        _choice("api", ("v1", "legacy", "auto")),
    ),
    _Setting(
        "queuedata",
        None,
        None,
        "Queue configuration (CRIC JSON): a file or an https URL.",
        _text("queuedata"),
    ),
    _Setting(
        "storagedata",
        None,
        None,
        "Storage endpoints (CRIC ddmendpoints JSON): a file or an https URL.",
        _text("storagedata"),
    ),
    _Setting(
        "transfer-parallelism",
        None,
        4,
        "Files moved at the same time during stage-in/out.",
        _nonnegative_int("transfer-parallelism"),
    ),
    _Setting(
        "transfer-progress",
        None,
        60.0,
        "Seconds between progress lines of a long transfer.",
        _positive_float("transfer-progress"),
    ),
    _Setting(
        "baseurls", "g", "", "Comma-separated base URLs to download transformations from.", _text("baseurls")
    ),
    _Setting(
        "token-file",
        None,
        None,
        "OIDC token file (default: $PANDA_AUTH_TOKEN / $OIDC_AUTH_TOKEN).",
        _text("token-file"),
    ),
    _Setting(
        "auth-origin",
        None,
        None,
        "Origin header (VO) sent with a token (default: $PANDA_AUTH_ORIGIN).",
        _text("auth-origin"),
    ),
    _Setting("heartbeat", None, 1800.0, "Seconds between job heartbeats.", _positive_float("heartbeat")),
    _Setting(
        "debug-heartbeat",
        None,
        60.0,
        "Seconds between heartbeats of a job in debug mode.",
        _positive_float("debug-heartbeat"),
    ),
    _Setting(
        "nojob-backoff",
        None,
        5.0,
        "First wait (s) after a request that got no job; doubles up to --nojob-backoff-max.",
        _positive_float("nojob-backoff"),
    ),
    _Setting(
        "nojob-backoff-max",
        None,
        60.0,
        "Longest wait (s) between job requests.",
        _positive_float("nojob-backoff-max"),
    ),
    _Setting(
        "kill-grace",
        None,
        10.0,
        "Seconds between SIGTERM and SIGKILL of a payload.",
        _positive_float("kill-grace"),
    ),
    _Setting(
        "shutdown-grace",
        None,
        60.0,
        "Seconds allowed for the final update when the pilot is stopped.",
        _positive_float("shutdown-grace"),
    ),
    _Setting(
        "lifetime-margin",
        None,
        180.0,
        "Seconds before the end of the lifetime at which a running job is stopped.",
        _positive_float("lifetime-margin"),
    ),
    _Setting(
        "keep-workdirs",
        None,
        "none",
        "Job work directories to keep: none, failed or all.",
        _choice("keep-workdirs", ("none", "failed", "all")),
    ),
    _Setting("summary-file", None, None, "Write a JSON summary of every job here.", _text("summary-file")),
    _Setting(
        "log-file",
        None,
        "pilotlog.json",
        "JSON log file (relative to the base directory).",
        _text("log-file"),
    ),
    _Setting("node", None, None, "Worker node name reported to PanDA (default: host name).", _text("node")),
    _Setting(
        "memory-interval", None, 60.0, "Seconds between memory-monitor samples.",
        _positive_float("memory-interval"),
    ),
    _Setting(
        "disk-interval", None, 60.0, "Seconds between work-directory and free-space checks.",
        _positive_float("disk-interval"),
    ),
    _Setting(
        "looping-interval", None, 900.0, "Seconds between looping-job checks.",
        _positive_float("looping-interval"),
    ),
    _Setting(
        "looping-limit", None, 7200.0, "Seconds without a file modified before a job is looping.",
        _positive_float("looping-limit"),
    ),
    _Setting(
        "debug-interval", None, 10.0, "Seconds between memory samples of a job in debug mode.",
        _positive_float("debug-interval"),
    ),
    _Setting(
        "stdout-limit", None, 2048.0, "Largest payload stdout/stderr or log.* file, in MiB.",
        _positive_float("stdout-limit"),
    ),
    _Setting(
        "min-free-space", None, 1000.0, "Free space (MB) a running job must leave; twice that to start.",
        _positive_float("min-free-space"),
    ),
)  # fmt: skip
_BY_NAME = {s.name: s for s in _SETTINGS}


def _fail(message: str, exit_code: ExitCode) -> NoReturn:
    sys.stderr.write(f"pilot: error: {message}\n")
    raise SystemExit(int(exit_code))


class PilotOptions(usage.Options):
    """``twistd pilot`` options; after parsing, ``self.config`` is a validated PilotConfig."""

    synopsis = "[options] -q QUEUE"
    longdesc = (
        "Ask a PanDA server for jobs for QUEUE, run them and report them, until the queue's "
        "timefloor or the pilot's lifetime is used up.  Exit codes are listed in the README."
    )
    optFlags = [
        ["debug", "d", "Debug logging."],
        ["version", None, "Print the version and exit."],
        ["no-worker-node-report", None, "Do not send the worker node's description (update_worker_node)."],
    ]
    optParameters = [
        [s.name, s.short, None, s.doc + (f" [default: {s.default}]" if s.default not in (None, "") else "")]
        for s in _SETTINGS
    ] + [
        ["config", "c", None, "TOML config file with a [pilot] table of these options."],
    ]

    config: PilotConfig

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._environ: Mapping[str, str] = os.environ if environ is None else environ

    def parseOptions(self, options: list[str] | None = None) -> None:
        try:
            super().parseOptions(options)  # type: ignore[no-untyped-call]
        except usage.UsageError as exc:
            _fail(str(exc), ExitCode.USAGE)

    def opt_version(self) -> None:
        sys.stdout.write(f"txpilot {__version__}\n")
        raise SystemExit(0)

    def postOptions(self) -> None:
        try:
            self.config = build_config(self, self._environ)
        except ConfigError as exc:
            _fail(str(exc), exc.exit_code)


def read_config_file(path: Path) -> dict[str, Any]:
    """The ``[pilot]`` table of a TOML config file, keys normalised to option names."""
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from None
    table = document.get("pilot", {})
    if not isinstance(table, dict):
        raise ConfigError(f"--config: {path}: [pilot] must be a table")
    values: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("_", "-")
        if name not in _BY_NAME and name not in ("debug", "no-worker-node-report"):
            raise ConfigError(f"--config: {path}: unknown setting {key!r}")
        values[name] = value
    return values


def _merged(options: Mapping[str, Any], file_values: Mapping[str, Any]) -> dict[str, Any]:
    """Command line over config file over defaults, each value converted and checked."""
    merged: dict[str, Any] = {}
    for setting in _SETTINGS:
        value = options.get(setting.name)
        if value is None:
            value = file_values.get(setting.name)
        merged[setting.name] = None if value is None else setting.convert(value)
        if merged[setting.name] is None and setting.default is not None:
            merged[setting.name] = setting.default
    merged["debug"] = bool(options.get("debug")) or bool(file_values.get("debug", False))
    merged["no-worker-node-report"] = bool(options.get("no-worker-node-report")) or bool(
        file_values.get("no-worker-node-report", False)
    )
    return merged


def server_base_url(url: str, port: int) -> str:
    """``--url`` plus ``--port`` (used only when the URL carries no port)."""
    parts = urlsplit(url if "://" in url else f"https://{url}")
    if parts.scheme != "https":
        raise ConfigError(f"--url: the PanDA server must be reached over https, got {url!r}")
    if not parts.hostname:
        raise ConfigError(f"--url: no host name in {url!r}")
    netloc = parts.netloc if parts.port else f"{parts.netloc}:{port}"
    return urlunsplit(("https", netloc, parts.path.rstrip("/"), "", ""))


def _find_token_file(option: str | None, environ: Mapping[str, str]) -> Path | None:
    """The OIDC token file, located the way grid middleware hands it over."""
    if option:
        return Path(option)
    name = environ.get("PANDA_AUTH_TOKEN") or environ.get("OIDC_AUTH_TOKEN")
    if not name:
        return None
    path = Path(name)
    if path.is_absolute():
        return path
    directory = environ.get("PANDA_AUTH_DIR") or environ.get("OIDC_AUTH_DIR")
    if directory:
        return Path(directory) / path
    proxy = environ.get("X509_USER_PROXY")
    if proxy:
        return Path(proxy).parent / path
    return Path.cwd() / path


def resolve_credentials(values: Mapping[str, Any], environ: Mapping[str, str]) -> Credentials:
    cacert = Path(values["cacert"]) if values.get("cacert") else None
    capath: Path | None = Path(values["capath"]) if values.get("capath") else None
    if cacert is None and capath is None:
        if environ.get("X509_CERT_DIR"):
            capath = Path(environ["X509_CERT_DIR"])
        elif Path("/etc/grid-security/certificates").is_dir():
            capath = Path("/etc/grid-security/certificates")
    for label, path, want_dir in (("--cacert", cacert, False), ("--capath", capath, True)):
        if path is not None and (path.is_dir() if want_dir else path.is_file()) is False:
            kind = "directory" if want_dir else "file"
            raise ConfigError(f"{label}: {path} is not a readable {kind}")
    proxy_env = environ.get("X509_USER_PROXY")
    proxy: Path | None = Path(proxy_env) if proxy_env else Path(f"/tmp/x509up_u{os.getuid()}")
    if proxy is not None and not proxy_env and not proxy.is_file():
        proxy = None
    token_file = _find_token_file(values.get("token-file"), environ)
    origin = values.get("auth-origin") or environ.get("PANDA_AUTH_ORIGIN") or environ.get("OIDC_AUTH_ORIGIN")
    return Credentials(cacert=cacert, capath=capath, proxy=proxy, token_file=token_file, auth_origin=origin)


def detect_batch_id(environ: Mapping[str, str]) -> str:
    """The batch system's id of the job this pilot runs in, for ``batchID``."""
    for key in ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID", "LOADL_STEP_ID", "CONDOR_JOBID"):
        if environ.get(key):
            return environ[key]
    ad = environ.get("_CONDOR_JOB_AD")
    if ad:
        try:
            for line in Path(ad).read_text(encoding="utf-8", errors="replace").splitlines():
                key, _, value = line.partition("=")
                if key.strip() == "GlobalJobId":
                    return value.strip().strip('"')
        except OSError:
            return ""
    return ""


def build_config(options: Mapping[str, Any], environ: Mapping[str, str]) -> PilotConfig:
    """Validate options (+ config file + environment) into a PilotConfig."""
    file_values = read_config_file(Path(options["config"])) if options.get("config") else {}
    values = _merged(options, file_values)
    queue = values["queue"]
    if not queue:
        raise ConfigError("-q/--queue is required")
    lifetime = values["lifetime"]
    if (
        options.get("lifetime") is None
        and file_values.get("lifetime") is None
        and environ.get("PANDAPILOT_LIFETIME")
    ):
        lifetime = _positive_float("lifetime")(environ["PANDAPILOT_LIFETIME"])
    if values["nojob-backoff-max"] < values["nojob-backoff"]:
        raise ConfigError("--nojob-backoff-max must not be shorter than --nojob-backoff")

    queuedata: QueueData | None = None
    source = values.get("queuedata")
    if source and not is_url(source):
        try:
            queuedata = load_queuedata_file(Path(source), queue)
        except PilotError as exc:
            raise ConfigError(f"--queuedata: {exc.detail}", exit_code_for(exc.code)) from None

    storage: StorageData | None = None
    storage_source = values.get("storagedata")
    if storage_source and not is_url(storage_source):
        try:
            storage = StorageData.from_file(Path(storage_source))
        except PilotError as exc:
            raise ConfigError(f"--storagedata: {exc.detail}", exit_code_for(exc.code)) from None

    workdir = Path(values["workdir"]).absolute() if values.get("workdir") else Path.cwd()
    log_file = Path(values["log-file"]) if values.get("log-file") else None
    summary = Path(values["summary-file"]) if values.get("summary-file") else None
    worker_id = environ.get("HARVESTER_WORKER_ID")
    return PilotConfig(
        queue=queue,
        server_url=server_base_url(values["url"], values["port"]),
        pilot_user=values["pilot-user"],
        job_label=values["job-label"],
        lifetime=lifetime,
        workdir=workdir,
        resource_type=values["resource-type"],
        getjob_requests=values["getjob-requests"],
        getjob_failures=values["getjob-failures"],
        api=ApiMode(values["api"]),
        credentials=resolve_credentials(values, environ),
        queuedata_source=source,
        queuedata=queuedata,
        storagedata_source=storage_source,
        storagedata=storage,
        transfer_parallelism=max(1, values["transfer-parallelism"]),
        transfer_progress=values["transfer-progress"],
        baseurls=tuple(u.strip().rstrip("/") for u in values["baseurls"].split(",") if u.strip()),
        debug=values["debug"],
        report_worker_node=not values["no-worker-node-report"],
        heartbeat_period=values["heartbeat"],
        debug_heartbeat_period=values["debug-heartbeat"],
        nojob_backoff=values["nojob-backoff"],
        nojob_backoff_max=values["nojob-backoff-max"],
        kill_grace=values["kill-grace"],
        shutdown_grace=values["shutdown-grace"],
        lifetime_margin=values["lifetime-margin"],
        keep_workdirs=KeepWorkdirs(values["keep-workdirs"]),
        summary_file=summary if summary is None or summary.is_absolute() else workdir / summary,
        log_file=log_file if log_file is None or log_file.is_absolute() else workdir / log_file,
        node=values.get("node") or socket.gethostname(),
        batch_id=detect_batch_id(environ),
        harvester_id=environ.get("HARVESTER_ID", ""),
        worker_id=int(worker_id) if worker_id and worker_id.isdigit() else None,
        monitor=MonitorSettings(
            memory_interval=values["memory-interval"],
            disk_interval=values["disk-interval"],
            looping_interval=values["looping-interval"],
            looping_limit=values["looping-limit"],
            debug_interval=values["debug-interval"],
            stdout_limit=int(values["stdout-limit"] * 1024 * 1024),
            min_free_running=int(values["min-free-space"] * 1e6),
            min_free_start=int(2 * values["min-free-space"] * 1e6),
        ),
    )
