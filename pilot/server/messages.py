"""What the pilot sends and what it gets back, as typed values, and their wire names.

``JobRequest`` and ``JobUpdate`` name their fields once, in Python style; the tables
below map each field to its name in the legacy API (``getJob``/``updateJob``) and in
the v1 API (``acquire_jobs``/``update_job``).  Values keep their Python types: the v1
server type-checks them (ints as ints, strings as strings).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import field, fields
from enum import IntEnum
from typing import Any

from pilot.server.api import ApiMode
from pilot.util.records import record


class StatusCode(IntEnum):
    """The job dispatcher's ``StatusCode`` values (``jobdispatcher/Protocol.py``)."""

    SUCCESS = 0
    TIMEOUT = 10
    NO_JOBS = 20
    FAILED = 30
    INVALID = 50
    ROLE = 60
    PERMISSION = 70
    MISSING_KEY = 80
    PROXY_ERROR = 90


@record(frozen=True)
class JobRequest:
    """What the pilot asks for when it asks for a job.  Sizes in MB, times in seconds."""

    site_name: str
    computing_element: str
    prod_source_label: str
    node: str
    disk_space: int | None = None
    memory: int | None = None
    cpu: int | None = None
    resource_type: str | None = None
    job_type: str | None = None
    working_group: str | None = None
    harvester_id: str | None = None
    worker_id: int | None = None
    remaining_time: int | None = None


#: JobRequest field → (legacy getJob name, v1 acquire_jobs name); None: not in that API.
_JOB_REQUEST_NAMES: dict[str, tuple[str | None, str | None]] = {
    "site_name": ("siteName", "site_name"),
    "computing_element": ("computingElement", "computing_element"),
    "prod_source_label": ("prodSourceLabel", "prod_source_label"),
    "node": ("node", "node"),
    "disk_space": ("diskSpace", "disk_space"),
    "memory": ("mem", "memory"),
    "cpu": ("cpu", None),
    "resource_type": ("resourceType", "resource_type"),
    "job_type": ("jobType", "job_type"),
    "working_group": ("workingGroup", None),
    "harvester_id": ("harvester_id", "harvester_id"),
    "worker_id": ("worker_id", "worker_id"),
    "remaining_time": ("remaining_time", "remaining_time"),
}


@record(frozen=True)
class JobUpdate:
    """One job update (heartbeat or final).  ``None`` fields are not sent."""

    job_id: int
    state: str
    attempt_nr: int | None = None
    timestamp: str | None = None
    site_name: str | None = None
    node: str | None = None
    scheduler_id: str | None = None
    pilot_id: str | None = None
    batch_id: str | None = None
    trans_exit_code: int | None = None
    pilot_error_code: int | None = None
    pilot_error_diag: str | None = None
    exe_error_code: int | None = None
    exe_error_diag: str | None = None
    pilot_timing: str | None = None
    start_time: str | None = None
    end_time: str | None = None
    cpu_consumption_time: int | None = None
    cpu_consumption_unit: str | None = None
    cpu_conversion_factor: float | None = None
    core_count: int | None = None
    mean_core_count: int | None = None
    n_events: int | None = None
    n_input_files: int | None = None
    job_metrics: str | None = None
    job_output_report: str | None = None
    meta_data: str | None = None
    pilot_log: str | None = None
    stdout: str | None = None
    job_sub_status: str | None = None
    cpu_architecture_level: str | None = None
    max_rss: int | None = None
    max_vmem: int | None = None
    max_swap: int | None = None
    max_pss: int | None = None
    avg_rss: int | None = None
    avg_vmem: int | None = None
    avg_swap: int | None = None
    avg_pss: int | None = None
    tot_rchar: int | None = None
    tot_wchar: int | None = None
    tot_rbytes: int | None = None
    tot_wbytes: int | None = None
    rate_rchar: float | None = None
    rate_wchar: float | None = None
    rate_rbytes: float | None = None
    rate_wbytes: float | None = None


#: JobUpdate field → (legacy updateJob name, v1 update_job name).
_JOB_UPDATE_NAMES: dict[str, tuple[str | None, str | None]] = {
    "job_id": ("jobId", "job_id"),
    "state": ("state", "job_status"),
    "attempt_nr": ("attemptNr", "attempt_nr"),
    "timestamp": ("timestamp", None),
    "site_name": ("siteName", "site_name"),
    "node": ("node", "node"),
    "scheduler_id": ("schedulerID", "scheduler_id"),
    "pilot_id": ("pilotID", "pilot_id"),
    "batch_id": ("batchID", "batch_id"),
    "trans_exit_code": ("transExitCode", "trans_exit_code"),
    "pilot_error_code": ("pilotErrorCode", "pilot_error_code"),
    "pilot_error_diag": ("pilotErrorDiag", "pilot_error_diag"),
    "exe_error_code": ("exeErrorCode", "exe_error_code"),
    "exe_error_diag": ("exeErrorDiag", "exe_error_diag"),
    "pilot_timing": ("pilotTiming", "pilot_timing"),
    "start_time": ("startTime", "start_time"),
    "end_time": ("endTime", "end_time"),
    "cpu_consumption_time": ("cpuConsumptionTime", "cpu_consumption_time"),
    "cpu_consumption_unit": ("cpuConsumptionUnit", "cpu_consumption_unit"),
    "cpu_conversion_factor": ("cpuConversionFactor", "cpu_conversion_factor"),
    "core_count": ("coreCount", "core_count"),
    "mean_core_count": ("meanCoreCount", "mean_core_count"),
    "n_events": ("nEvents", "n_events"),
    "n_input_files": ("nInputFiles", "n_input_files"),
    "job_metrics": ("jobMetrics", "job_metrics"),
    "job_output_report": ("xml", "job_output_report"),
    "meta_data": ("metaData", "meta_data"),
    "pilot_log": ("pilotLog", "pilot_log"),
    "stdout": ("stdout", "stdout"),
    "job_sub_status": ("jobSubStatus", "job_sub_status"),
    "cpu_architecture_level": ("cpu_architecture_level", "cpu_architecture_level"),
    "max_rss": ("maxRSS", "max_rss"),
    "max_vmem": ("maxVMEM", "max_vmem"),
    "max_swap": ("maxSWAP", "max_swap"),
    "max_pss": ("maxPSS", "max_pss"),
    "avg_rss": ("avgRSS", "avg_rss"),
    "avg_vmem": ("avgVMEM", "avg_vmem"),
    "avg_swap": ("avgSWAP", "avg_swap"),
    "avg_pss": ("avgPSS", "avg_pss"),
    "tot_rchar": ("totRCHAR", "tot_rchar"),
    "tot_wchar": ("totWCHAR", "tot_wchar"),
    "tot_rbytes": ("totRBYTES", "tot_rbytes"),
    "tot_wbytes": ("totWBYTES", "tot_wbytes"),
    "rate_rchar": ("rateRCHAR", "rate_rchar"),
    "rate_wchar": ("rateWCHAR", "rate_wchar"),
    "rate_rbytes": ("rateRBYTES", "rate_rbytes"),
    "rate_wbytes": ("rateWBYTES", "rate_wbytes"),
}


@record(frozen=True)
class AcquireResult:
    """The outcome of a job request: jobs (raw dicts) when ``status`` is SUCCESS."""

    status: StatusCode
    jobs: tuple[Mapping[str, Any], ...] = ()
    message: str = ""


@record(frozen=True)
class UpdateResult:
    """The outcome of a job update and the server's commands for the pilot."""

    status: StatusCode
    commands: tuple[str, ...] = ()
    message: str = ""
    pilot_secrets: str | None = field(default=None, repr=False)

    @property
    def accepted(self) -> bool:
        return self.status is StatusCode.SUCCESS


def _encode(
    values: Mapping[str, Any], names: Mapping[str, tuple[str | None, str | None]], api: ApiMode
) -> dict[str, Any]:
    index = 0 if api is ApiMode.LEGACY else 1
    encoded: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        name = names[key][index]
        if name is not None:
            encoded[name] = value
    return encoded


def encode_job_request(request: JobRequest, api: ApiMode) -> dict[str, Any]:
    """The parameters of getJob (legacy) or acquire_jobs (v1) for ``request``."""
    return _encode({f.name: getattr(request, f.name) for f in fields(request)}, _JOB_REQUEST_NAMES, api)


def encode_job_update(update: JobUpdate, api: ApiMode) -> dict[str, Any]:
    """The parameters of updateJob (legacy) or update_job (v1) for ``update``."""
    return _encode({f.name: getattr(update, f.name) for f in fields(update)}, _JOB_UPDATE_NAMES, api)


def parse_commands(raw: object) -> tuple[str, ...]:
    """``"debug,tobekilled"`` → ``("debug", "tobekilled")``; ``NULL``/None → ``()``."""
    if not isinstance(raw, str):
        return ()
    return tuple(c.strip() for c in raw.split(",") if c.strip() and c.strip() not in ("NULL", "None"))
