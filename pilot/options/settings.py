"""The pilot's own options as data: name, short letter, default, help, and the check of a value.

One table serves the command line (``usage.Options``), the config file (same names)
and ``--help``, so the three cannot drift apart.  Every converter accepts what the
command line gives (text) and what TOML gives (numbers, booleans, text) and raises
``ConfigError`` with the one line the operator sees: a value that merely looks right
(``debug = "false"``, ``--port 99999``) is an error, never a silent surprise.
"""

from __future__ import annotations

from collections.abc import Callable

from pilot.errors import ExitCode
from pilot.util.records import record

DEFAULT_URL = "https://pandaserver.cern.ch"
DEFAULT_PORT = 25443

#: ``--transfer-parallelism`` bounds: one file at a time up to what a worker node's
#: network and the storage's per-client limits sensibly bear.
MAX_TRANSFER_PARALLELISM = 64

#: pilot3's ``-w/--workflow`` choices; only ``generic`` means something here.
PILOT3_WORKFLOWS = (
    "generic",
    "generic_hpc",
    "production",
    "production_hpc",
    "analysis",
    "analysis_hpc",
    "eventservice_hpc",
    "stager",
    "payload_stageout",
)

Converter = Callable[[object], object]


class ConfigError(Exception):
    """A setting is unusable; the message is the one line the operator sees."""

    def __init__(self, message: str, exit_code: ExitCode = ExitCode.USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _number_text(name: str, value: object, expected: str) -> str:
    """``value`` as text for ``int()``/``float()``; a TOML boolean is not a number."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(f"--{name}: expected {expected}, got {value!r}")
    return str(value).strip()


def positive(name: str, expected: str = "a number of seconds") -> Converter:
    """A positive, finite number (seconds unless ``expected`` says otherwise)."""

    def convert(value: object) -> float:
        try:
            number = float(_number_text(name, value, expected))
        except ValueError:
            raise ConfigError(f"--{name}: expected {expected}, got {value!r}") from None
        if not 0 < number < float("inf"):
            raise ConfigError(f"--{name}: must be positive, got {value!r}")
        return number

    return convert


seconds = positive


def nonnegative(name: str) -> Converter:
    """Zero or a positive, finite number of seconds."""

    def convert(value: object) -> float:
        try:
            number = float(_number_text(name, value, "a number of seconds"))
        except ValueError:
            raise ConfigError(f"--{name}: expected a number of seconds, got {value!r}") from None
        if not 0 <= number < float("inf"):
            raise ConfigError(f"--{name}: must be zero or positive, got {value!r}")
        return number

    return convert


def whole(name: str, low: int = 0, high: int | None = None) -> Converter:
    """A whole number in ``low..high`` (no upper bound when ``high`` is None)."""

    def convert(value: object) -> int:
        try:
            number = int(_number_text(name, value, "a whole number"))
        except ValueError:
            raise ConfigError(f"--{name}: expected a whole number, got {value!r}") from None
        if number < low or (high is not None and number > high):
            if high is not None:
                raise ConfigError(f"--{name}: must be between {low} and {high}, got {value!r}")
            bound = "must not be negative" if low == 0 else f"must be at least {low}"
            raise ConfigError(f"--{name}: {bound}, got {value!r}")
        return number

    return convert


def text(name: str) -> Converter:
    def convert(value: object) -> str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"--{name}: expected text, got {value!r}")
        return str(value)

    return convert


def choice(name: str, choices: tuple[str, ...], *, fold_case: bool = False) -> Converter:
    """One of ``choices``; with ``fold_case``, in any case and normalised to the listed spelling."""

    def convert(value: object) -> str:
        given = str(value)
        for option in choices:
            if given == option or (fold_case and given.lower() == option.lower()):
                return option
        raise ConfigError(f"--{name}: expected one of {', '.join(choices)}, got {value!r}")

    return convert


def flag(name: str) -> Converter:
    """A switch: a TOML boolean, or the text ``true``/``false`` in any case, nothing else.

    ``bool("false")`` is True, so anything looser turns a config file's
    ``debug = "false"`` into debug logging.
    """

    def convert(value: object) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ConfigError(f"--{name}: expected true or false, got {value!r}")

    return convert


_TRUE = frozenset({"yes", "true", "t", "y", "1"})
_FALSE = frozenset({"no", "false", "f", "n", "0"})


def str2bool(name: str) -> Converter:
    """A boolean option that takes a value, as pilot3 reads one (``--cleanup False``).

    pilot3's wrappers write these values in several spellings (True, false, 1, yes), so
    the same words are accepted in any case; everything else is an error.
    """

    def convert(value: object) -> bool:
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower() if isinstance(value, str | int) else None
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise ConfigError(f"--{name}: expected a boolean (true/false, yes/no, 1/0), got {value!r}")

    return convert


@record(frozen=True)
class Setting:
    """One option: its long name, short letter, default, help text and converter.

    ``is_flag`` options take no value on the command line (given means true); in the
    config file they are booleans.
    """

    name: str
    short: str | None
    default: object
    doc: str
    convert: Converter
    is_flag: bool = False


def _flag(name: str, short: str | None, doc: str) -> Setting:
    return Setting(name, short, False, doc, flag(name), is_flag=True)


SETTINGS: tuple[Setting, ...] = (
    Setting("queue", "q", None, "PanDA queue to take jobs for (required).", text("queue")),
    Setting("url", None, DEFAULT_URL, "PanDA server URL (https).", text("url")),
    Setting("port", "p", DEFAULT_PORT, "PanDA server port (1-65535), if --url has none.", whole("port", 1, 65535)),
    Setting("pilot-user", None, "generic", "Experiment plug-in name.", text("pilot-user")),
    Setting(
        "job-label", "j", "ptest", "prodSourceLabel to ask jobs for (managed, user, test, ptest...); "
        "pilot3: --joblabel.", text("job-label"),
    ),
    Setting(
        "versiontag", "i", "PR", "Version tag (pilot3's PR, RC, RCM, ALRB): part of pilotID; RCM with "
        "label ptest asks for rcm_test2 and ALRB for rc_alrb, as pilot3 does.", text("versiontag"),
    ),
    Setting("job-type", None, "", "jobType to ask for (managed, user, unified...).", text("job-type")),
    Setting("working-group", None, "", "workingGroup to ask for.", text("working-group")),
    Setting("country-group", None, "", "countryGroup to ask for.", text("country-group")),
    Setting(
        "allow-other-country", None, False, "allowOtherCountry in the job request (true/false).",
        str2bool("allow-other-country"),
    ),
    Setting(
        "allow-same-user", None, True, "In a multi-job pilot, ask for the next job of the previous job's "
        "task (taskID; true/false).", str2bool("allow-same-user"),
    ),
    Setting(
        "workflow", "w", "generic", "pilot3 workflow; txpilot runs the generic one (others are accepted "
        "with a notice).", choice("workflow", PILOT3_WORKFLOWS),
    ),
    Setting("lifetime", "l", 324000.0, "Pilot lifetime in seconds.", seconds("lifetime")),
    Setting(
        "workdir", "a", None, "Base directory for the pilot's work directory (default: cwd).", text("workdir")
    ),
    Setting("resource-type", None, "", "Resource type to ask for (SCORE, MCORE, ...).", text("resource-type")),
    Setting(
        "getjob-requests", "v", 2, "Consecutive job requests without a job before the pilot ends; "
        "pilot3: --getjobrequests.", whole("getjob-requests"),
    ),
    Setting(
        "getjob-failures", "x", 5, "Consecutive failed job requests before the pilot ends; "
        "pilot3: --getjobfailures.", whole("getjob-failures"),
    ),
    Setting("cacert", None, None, "CA certificate bundle (PEM) for the server's certificate.", text("cacert")),
    Setting(
        "capath", None, None, "CA directory (hashed) for the server's certificate; default $X509_CERT_DIR.",
        text("capath"),
    ),
    Setting(
        "api", None, "auto", "Server API generation: v1, legacy or auto (v1, falling back to legacy).",
        choice("api", ("v1", "legacy", "auto")),
    ),
    Setting(
        "queuedata", None, None, "Queue configuration (CRIC JSON): a file or an https URL; "
        "pilot3: --queuedata-url.", text("queuedata"),
    ),
    Setting(
        "storagedata", None, None, "Storage endpoints (CRIC ddmendpoints JSON): a file or an https URL; "
        "pilot3: --storagedata-url.", text("storagedata"),
    ),
    Setting(
        "transfer-parallelism", None, 4,
        f"Files moved at the same time during stage-in/out (1-{MAX_TRANSFER_PARALLELISM}).",
        whole("transfer-parallelism", 1, MAX_TRANSFER_PARALLELISM),
    ),
    Setting(
        "transfer-progress", None, 60.0, "Seconds between progress lines of a long transfer.",
        seconds("transfer-progress"),
    ),
    Setting(
        "es-ranges-per-request", None, 1, "Event service: ranges handed to a payload worker per request.",
        whole("es-ranges-per-request", 1, 100),
    ),
    Setting(
        "es-max-fetch", None, 1000, "Event service: most ranges asked of the server in one request.",
        whole("es-max-fetch", 1, 10000),
    ),
    Setting(
        "es-batch-ranges", None, 100, "Event service: finished ranges per archive (an archive closes earlier "
        "after the zip time gap).", whole("es-batch-ranges", 1, 100000),
    ),
    Setting(
        "es-zip-time-gap", None, 0.0, "Event service: seconds a finished range waits for its archive at most "
        "(0: the queue's zip_time_gap, else 600).", nonnegative("es-zip-time-gap"),
    ),
    Setting(
        "baseurls", "g", "", "Comma-separated base URLs to download transformations from.", text("baseurls")
    ),
    Setting(
        "token-file", None, None, "OIDC token file (default: $PANDA_AUTH_TOKEN / $OIDC_AUTH_TOKEN).",
        text("token-file"),
    ),
    Setting(
        "auth-origin", None, None, "Origin header (VO) sent with a token (default: $PANDA_AUTH_ORIGIN).",
        text("auth-origin"),
    ),
    Setting("heartbeat", None, 1800.0, "Seconds between job heartbeats.", seconds("heartbeat")),
    Setting(
        "debug-heartbeat", None, 60.0, "Seconds between heartbeats of a job in debug mode.",
        seconds("debug-heartbeat"),
    ),
    Setting(
        "nojob-backoff", None, 5.0,
        "First wait (s) after a request that got no job; doubles up to --nojob-backoff-max.",
        seconds("nojob-backoff"),
    ),
    Setting("nojob-backoff-max", None, 60.0, "Longest wait (s) between job requests.", seconds("nojob-backoff-max")),
    Setting("kill-grace", None, 10.0, "Seconds between SIGTERM and SIGKILL of a payload.", seconds("kill-grace")),
    Setting(
        "shutdown-grace", None, 60.0, "Seconds allowed for the final update when the pilot is stopped.",
        seconds("shutdown-grace"),
    ),
    Setting(
        "lifetime-margin", None, 180.0,
        "Seconds before the end of the lifetime at which a running job is stopped (less than --lifetime).",
        seconds("lifetime-margin"),
    ),
    Setting(
        "keep-workdirs", None, "none", "Job work directories to keep: none, failed or all.",
        choice("keep-workdirs", ("none", "failed", "all")),
    ),
    Setting(
        "cgroups", None, "auto", "A cgroup v2 per job where the pilot has a delegated subtree (auto), "
        "or process groups and the job's environment marker only (off).", choice("cgroups", ("auto", "off")),
    ),
    Setting(
        "cleanup", None, True, "pilot3's switch: false keeps every work directory (--keep-workdirs all) "
        "unless --keep-workdirs is given.", str2bool("cleanup"),
    ),
    Setting(
        "file-mode", None, "private", "Who may read what the pilot writes (job directories, payload "
        "stdout/stderr, logs, summaries): private (the pilot's uid) or group (its group too).",
        choice("file-mode", ("private", "group")),
    ),
    Setting("summary-file", None, None, "Write a JSON summary of every job here.", text("summary-file")),
    Setting(
        "log-file", None, "pilotlog.json", "JSON log file (relative to the base directory).", text("log-file")
    ),
    Setting("node", None, None, "Worker node name reported to PanDA (default: host name).", text("node")),
    Setting(
        "memory-interval", None, 60.0, "Seconds between memory-monitor samples.", seconds("memory-interval"),
    ),
    Setting(
        "disk-interval", None, 60.0, "Seconds between work-directory and free-space checks.",
        seconds("disk-interval"),
    ),
    Setting("looping-interval", None, 900.0, "Seconds between looping-job checks.", seconds("looping-interval")),
    Setting(
        "looping-limit", None, 7200.0, "Seconds without a file modified before a job is looping.",
        seconds("looping-limit"),
    ),
    Setting(
        "debug-interval", None, 10.0, "Seconds between memory samples of a job in debug mode.",
        seconds("debug-interval"),
    ),
    Setting(
        "stdout-limit", None, 2048.0, "Largest payload stdout/stderr or log.* file, in MiB.",
        positive("stdout-limit", "a number of MiB"),
    ),
    Setting(
        "min-free-space", None, 1000.0, "Free space (MB) a running job must leave; twice that to start.",
        positive("min-free-space", "a number of MB"),
    ),
    Setting(
        "harvester-submit-mode", None, "PULL", "Harvester submit mode: PULL (jobs from the server) or PUSH "
        "(jobs, updates and event ranges through Harvester's files in --harvester-workdir; no network).",
        choice("harvester-submit-mode", ("PULL", "PUSH"), fold_case=True),
    ),
    Setting("harvester-workdir", None, None, "Harvester's access point (the worker directory; default "
            "$HARVESTER_WORKDIR): its shared files are exchanged there.", text("harvester-workdir")),
    Setting("harvester-datadir", None, None, "Where ARC's (or Harvester's) pandaJobData.out is (default: "
            "the work directory).", text("harvester-datadir")),
    Setting("harvester-eventstatusdump", None, None, "Path of Harvester's event status file (default "
            "event_status.dump.json in the access point).", text("harvester-eventstatusdump")),
    Setting("harvester-workerattributes", None, None, "Path of Harvester's worker attributes file (default "
            "worker_attributes.json in the access point).", text("harvester-workerattributes")),
    Setting("harvester-interval", None, 10.0, "How often to look for Harvester's answers, in seconds.",
            positive("harvester-interval")),
    Setting("harvester-job-wait", None, 600.0, "How long one request for a job waits for Harvester "
            "before it counts as no job, in seconds.", positive("harvester-job-wait")),
    Setting("harvester-killworker", None, "kill_worker.json", "Name of the file that asks Harvester to "
            "end the batch worker (pilot3 writes kill_worker).", text("harvester-killworker")),
    _flag("debug", "d", "Debug logging."),
    _flag("no-worker-node-report", None, "Do not send the worker node's description (update_worker_node)."),
    _flag("no-pilot-log", None, "Write no JSON log file (same as an empty --log-file)."),
    _flag(
        "allow-http-transformations", None, "Run transformations and pre/post-process scripts fetched "
        "over plain http without a sha256 checksum (a trusted site network only).",
    ),
    _flag(
        "noserverupdate", "z", "Talk to no server: jobs and updates through files, Harvester's (with "
        "--harvester-workdir) or ARC's (pandaJobData.out, heartbeat.json).",
    ),
)  # fmt: skip

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
