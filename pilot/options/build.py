"""Options, config file and environment → one validated ``PilotConfig``.

The command line wins over the config file, the file over the environment
(``PANDAPILOT_LIFETIME``) and the environment over the defaults.  Every value is
converted and checked here, once, so the rest of the pilot never reads option
dictionaries or ``os.environ``.  A bad value is a ``ConfigError`` carrying the one line
the operator sees and the documented exit code.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pilot.config import CgroupMode, EventServiceOptions, HarvesterFiles, KeepWorkdirs, PilotConfig
from pilot.errors import PilotError, exit_code_for
from pilot.model.credentials import Credentials
from pilot.monitor.settings import MonitorSettings
from pilot.options.pilot3 import (
    ALIASES,
    HARVESTER_FILES,
    INERT,
    INERT_BY_NAME,
    inert_notices,
    job_label_for,
    setting_notices,
)
from pilot.options.settings import BY_NAME, SETTINGS, ConfigError, seconds
from pilot.queuedata import QueueData, is_url, load_queuedata_file
from pilot.server.api import ApiMode
from pilot.staging.storage import StorageData

#: Keys of the config file's [pilot] table besides the settings: pilot3's names.
_FILE_ONLY_KEYS = set(ALIASES) | set(INERT_BY_NAME)


def read_config_file(path: Path) -> dict[str, Any]:
    """The ``[pilot]`` table of a TOML config file, keys normalised to setting names.

    Keys are the long option names (``job-label`` or ``job_label``), pilot3's spellings
    included (``joblabel``); two keys naming one setting are an error, since the file
    has no order to decide between them.
    """
    import tomllib

    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)  # imported here: most pilots have no config file
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from None
    table = document.get("pilot", {})
    if not isinstance(table, dict):
        raise ConfigError(f"--config: {path}: [pilot] must be a table")
    values: dict[str, Any] = {}
    keys: dict[str, str] = {}
    for key, value in table.items():
        name = key.replace("_", "-")
        if name not in BY_NAME and name not in _FILE_ONLY_KEYS:
            raise ConfigError(f"--config: {path}: unknown setting {key!r}")
        name = ALIASES.get(name, name)
        if name in keys:
            raise ConfigError(f"--config: {path}: {keys[name]!r} and {key!r} set the same setting")
        keys[name] = key
        values[name] = value
    return values


def _merged(
    options: Mapping[str, Any], file_values: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Command line over config file over defaults, each value converted and checked.

    Returns the settings' values and, separately, the converted values of the inert
    pilot3 options that were given (they only produce notices).
    """
    merged: dict[str, Any] = {}
    for setting in SETTINGS:
        value = options.get(setting.name)
        if setting.is_flag:
            value = True if value else None
        if value is None:
            value = file_values.get(setting.name)
        merged[setting.name] = setting.default if value is None else setting.convert(value)
    inert: dict[str, Any] = {}
    for option in INERT:
        value = options.get(option.name)
        if option.kind == "flag":
            value = True if value else None
        if value is None:
            value = file_values.get(option.name)
        if value is not None:
            inert[option.name] = option.convert(value)
    return merged, inert


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


def _given(name: str, options: Mapping[str, Any], file_values: Mapping[str, Any]) -> bool:
    """Whether a setting was set explicitly, on the command line or in the config file."""
    return options.get(name) not in (None, 0, False) or name in file_values


def _server_url(values: Mapping[str, Any]) -> str:
    try:
        return server_base_url(values["url"], values["port"])
    except ValueError as exc:  # urlsplit: a port out of range or not a number in --url
        raise ConfigError(f"--url: {exc} in {values['url']!r}") from None


def _checked_times(values: Mapping[str, Any], lifetime: float) -> None:
    if values["nojob-backoff-max"] < values["nojob-backoff"]:
        raise ConfigError("--nojob-backoff-max must not be shorter than --nojob-backoff")
    if lifetime <= values["lifetime-margin"]:
        # Such a pilot would stop every job before it starts: it would exit 0 having
        # asked for nothing, which looks like an empty queue.
        raise ConfigError(
            f"--lifetime ({lifetime:g} s) must be longer than --lifetime-margin "
            f"({values['lifetime-margin']:g} s)"
        )


def _keep_workdirs(
    values: Mapping[str, Any], options: Mapping[str, Any], file_values: Mapping[str, Any]
) -> KeepWorkdirs:
    """``--keep-workdirs``; pilot3's ``--cleanup false`` keeps everything unless it is given."""
    if not values["cleanup"] and not _given("keep-workdirs", options, file_values):
        return KeepWorkdirs.ALL
    return KeepWorkdirs(values["keep-workdirs"])


def _log_file(
    values: Mapping[str, Any], options: Mapping[str, Any], file_values: Mapping[str, Any], workdir: Path
) -> Path | None:
    if values["no-pilot-log"]:
        if _given("log-file", options, file_values):
            raise ConfigError("--no-pilot-log and --log-file contradict each other")
        return None
    log_file = Path(values["log-file"]) if values.get("log-file") else None
    return log_file if log_file is None or log_file.is_absolute() else workdir / log_file


def _harvester(values: Mapping[str, Any], environ: Mapping[str, str]) -> HarvesterFiles:
    given = dict(values)
    if not given.get("harvester-workdir") and environ.get("HARVESTER_WORKDIR"):
        given["harvester-workdir"] = environ["HARVESTER_WORKDIR"]
    workdir, datadir, event_status_dump, worker_attributes = (
        Path(given[name]).absolute() if given.get(name) else None for name in HARVESTER_FILES
    )
    kill = values["harvester-killworker"]
    if not kill or "/" in kill or kill in (".", ".."):
        raise ConfigError(f"--harvester-killworker: a file name, got {kill!r}")
    files = HarvesterFiles(
        values["harvester-submit-mode"],
        workdir=workdir,
        datadir=datadir,
        event_status_dump=event_status_dump,
        worker_attributes=worker_attributes,
        no_server_update=bool(values["noserverupdate"]),
        interval=values["harvester-interval"],
        job_wait=values["harvester-job-wait"],
        kill_worker=kill,
    )
    if values["harvester-submit-mode"] == "PUSH" and files.workdir is None:
        raise ConfigError("--harvester-submit-mode PUSH needs --harvester-workdir (or $HARVESTER_WORKDIR)")
    return files


def build_config(options: Mapping[str, Any], environ: Mapping[str, str]) -> PilotConfig:
    """Validate options (+ config file + environment) into a PilotConfig."""
    file_values = read_config_file(Path(options["config"])) if options.get("config") else {}
    values, inert = _merged(options, file_values)
    queue = values["queue"]
    if not queue:
        raise ConfigError("-q/--queue is required")
    lifetime = values["lifetime"]
    if not _given("lifetime", options, file_values) and environ.get("PANDAPILOT_LIFETIME"):
        lifetime = seconds("lifetime")(environ["PANDAPILOT_LIFETIME"])
    _checked_times(values, lifetime)
    server_url = _server_url(values)
    harvester = _harvester(values, environ)
    if harvester.offline:
        remote = [f"--{name}" for name in ("queuedata", "storagedata") if is_url(values.get(name) or "")]
        if remote:
            raise ConfigError(
                f"{' and '.join(remote)}: a URL, but in {harvester.mode} file mode the pilot opens no "
                "network connection; give a local file"
            )

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
    summary = Path(values["summary-file"]) if values.get("summary-file") else None
    worker_id = environ.get("HARVESTER_WORKER_ID")
    return PilotConfig(
        queue=queue,
        server_url=server_url,
        pilot_user=values["pilot-user"],
        job_label=job_label_for(values["job-label"], values["versiontag"]),
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
        transfer_parallelism=values["transfer-parallelism"],
        transfer_progress=values["transfer-progress"],
        event_service=EventServiceOptions(
            ranges_per_request=values["es-ranges-per-request"],
            max_fetch=values["es-max-fetch"],
            batch_ranges=values["es-batch-ranges"],
            zip_time_gap=values["es-zip-time-gap"],
        ),
        baseurls=tuple(u.strip().rstrip("/") for u in values["baseurls"].split(",") if u.strip()),
        debug=values["debug"],
        report_worker_node=not values["no-worker-node-report"] and not harvester.offline,
        allow_http_transformations=values["allow-http-transformations"],
        file_mode=values["file-mode"],
        heartbeat_period=values["heartbeat"],
        debug_heartbeat_period=values["debug-heartbeat"],
        nojob_backoff=values["nojob-backoff"],
        nojob_backoff_max=values["nojob-backoff-max"],
        kill_grace=values["kill-grace"],
        shutdown_grace=values["shutdown-grace"],
        lifetime_margin=values["lifetime-margin"],
        keep_workdirs=_keep_workdirs(values, options, file_values),
        cgroups=CgroupMode(values["cgroups"]),
        summary_file=summary if summary is None or summary.is_absolute() else workdir / summary,
        log_file=_log_file(values, options, file_values, workdir),
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
        version_tag=values["versiontag"],
        job_type=values["job-type"],
        working_group=values["working-group"],
        country_group=values["country-group"],
        allow_other_country=values["allow-other-country"],
        allow_same_user=values["allow-same-user"],
        workflow=values["workflow"],
        update_server=not values["noserverupdate"],
        harvester=harvester,
        notices=tuple(inert_notices(inert) + setting_notices(values)),
    )
