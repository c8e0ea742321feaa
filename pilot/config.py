"""The pilot's resolved settings: one immutable object built from options + config file.

Everything that shapes the pilot's behaviour is here, already validated and in
seconds, so the rest of the code never reads ``os.environ`` or option dictionaries.
Environment variables that grid middleware sets (``X509_USER_PROXY``,
``X509_CERT_DIR``, ``PANDA_AUTH_TOKEN``, ``HARVESTER_*``, batch-system ids) are read
once, by ``pilot.options``, and land here.
"""

from __future__ import annotations

from dataclasses import field
from enum import Enum
from pathlib import Path

from pilot.model.credentials import Credentials
from pilot.monitor.settings import MonitorSettings
from pilot.queuedata import QueueData
from pilot.server.api import ApiMode
from pilot.staging.storage import StorageData
from pilot.util.files import FILE_MODES, FileModes
from pilot.util.records import record


class KeepWorkdirs(Enum):
    """Which job work directories survive the job."""

    NONE = "none"
    FAILED = "failed"
    ALL = "all"


class CgroupMode(Enum):
    """Whether each job gets a cgroup v2 of its own (``--cgroups``, ``pilot.process.cgroup``)."""

    AUTO = "auto"  # where the pilot has a delegated subtree; else process groups
    OFF = "off"


@record(frozen=True)
class HarvesterFiles:
    """Harvester's and ARC's hand-over files (pilot3's ``-z`` and ``--harvester-*`` options).

    ``mode`` says where jobs come from and updates go (``pilot.source``): ``server``
    (the PanDA server; under Harvester's pull mode the pilot also keeps Harvester's
    heartbeat and kill files in ``workdir``), ``harvester`` (Harvester's shared files in
    ``workdir``: push mode, or ``-z`` with a Harvester directory) or ``arc`` (``-z``
    without one: the job from ``pandaJobData.out``, updates to ``heartbeat.json``).
    """

    submit_mode: str = "PULL"
    workdir: Path | None = None
    datadir: Path | None = None
    event_status_dump: Path | None = None
    worker_attributes: Path | None = None
    no_server_update: bool = False
    #: How often the pilot looks for Harvester's answers (seconds).
    interval: float = 10.0
    #: How long one request for a job waits for Harvester before it counts as "no job".
    job_wait: float = 600.0
    kill_worker: str = "kill_worker.json"

    @property
    def mode(self) -> str:
        if self.workdir is not None and (self.submit_mode == "PUSH" or self.no_server_update):
            return "harvester"
        if self.no_server_update:
            return "arc"
        return "server"

    @property
    def offline(self) -> bool:
        """Jobs and updates go through files: the pilot opens no network connection at all."""
        return self.mode != "server"


@record(frozen=True)
class EventServiceOptions:
    """How event-service jobs fetch, hand out and batch ranges (``--es-*`` options).

    ``zip_time_gap`` 0 means the queue's ``zip_time_gap`` (600 s without one).
    """

    ranges_per_request: int = 1
    min_fetch: int = 8
    max_fetch: int = 1000
    batch_ranges: int = 100
    zip_time_gap: float = 0.0


@record(frozen=True)
class PilotConfig:
    queue: str
    server_url: str
    pilot_user: str = "generic"
    job_label: str = "ptest"
    lifetime: float = 324000.0
    workdir: Path = Path(".")
    resource_type: str = ""
    getjob_requests: int = 2
    getjob_failures: int = 5
    api: ApiMode = ApiMode.AUTO
    credentials: Credentials = field(default_factory=Credentials)
    queuedata_source: str | None = None
    queuedata: QueueData | None = None
    storagedata_source: str | None = None
    storagedata: StorageData | None = None
    transfer_parallelism: int = 4
    transfer_progress: float = 60.0
    baseurls: tuple[str, ...] = ()
    debug: bool = False
    heartbeat_period: float = 1800.0
    debug_heartbeat_period: float = 60.0
    nojob_backoff: float = 5.0
    nojob_backoff_max: float = 60.0
    kill_grace: float = 10.0
    shutdown_grace: float = 60.0
    lifetime_margin: float = 180.0
    keep_workdirs: KeepWorkdirs = KeepWorkdirs.NONE
    cgroups: CgroupMode = CgroupMode.AUTO
    monitor: MonitorSettings = field(default_factory=MonitorSettings)
    report_worker_node: bool = True
    summary_file: Path | None = None
    log_file: Path | None = None
    node: str = ""
    batch_id: str = ""
    harvester_id: str = ""
    worker_id: int | None = None
    #: Run transformations and pre/post-process scripts fetched over plain http without a
    #: sha256 checksum (a site that serves them on a trusted network).
    allow_http_transformations: bool = False
    #: ``private`` or ``group``: the modes of what the pilot writes (``pilot.util.files.FILE_MODES``).
    file_mode: str = "private"
    #: pilot3's version tag (``-i``): the third field of pilotID ("PR", "RC"...).
    version_tag: str = "PR"
    #: Job request fields from pilot3's options: jobType, workingGroup, countryGroup,
    #: allowOtherCountry; empty or False: not sent.
    job_type: str = ""
    working_group: str = ""
    country_group: str = ""
    allow_other_country: bool = False
    #: pilot3's --allow-same-user: a multi-job pilot asks for the next job of the same task.
    allow_same_user: bool = True
    workflow: str = "generic"
    #: False when pilot3's ``-z`` asked for file-based reporting (not implemented: see notices).
    update_server: bool = True
    harvester: HarvesterFiles = field(default_factory=HarvesterFiles)
    event_service: EventServiceOptions = field(default_factory=EventServiceOptions)
    #: Keep a journal in the work area so that a successor can finish this pilot's jobs.
    journal: bool = True
    #: One line each, logged once at start: options accepted for pilot3's wrappers that
    #: do nothing here, and why.
    notices: tuple[str, ...] = ()

    @property
    def modes(self) -> FileModes:
        """The modes of what the pilot writes, from ``file_mode``."""
        return FILE_MODES[self.file_mode]
