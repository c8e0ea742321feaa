"""Job definitions: from a submitter's "friendly" dict to the exact dict a pilot receives.

Developers submit jobs with only the fields they care about (``transformation``,
``jobPars``, ``outFiles``, ``computingSite``, ...).  ``normalise_job`` completes
them the way the real server's tables would (unset columns become the string
``"NULL"``, counters ``0``, per-file values comma-joined) and generates what the
server generates (``logGUID``, ``jobName``, ``jobDefinitionID``, the log file).
``render_job`` then produces the pilot's job dict with the key order and value
types of ``jobdispatcher/Protocol.py:Response.appendJob`` (compare
``/work/shared/reference/samples``), so urlencoded replies match byte for byte.

Deliberate development defaults (the real server gets these from its submitter or
brokerage): ``prodSourceLabel`` ``managed``, ``destinationSE`` = ``computingSite``,
``resource_type`` ``SCORE``/``MCORE`` from ``coreCount``, ``prodUserID`` = the
submitter's DN, one ``panda.destDB.<uuid>`` output dataset, and a generated GUID
for input files that have none.

``esRanges`` (development only, never sent to a pilot) stands in for JEDI's event table:
``{"count": N, "eventsPerRange": k, "firstEvent": f, "attemptNr": a}`` gives an
event-service job N ranges of k events over its first input file (``pilot.devserver.events``).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pilot.devserver.auth import clean_user_id

#: ``appendJob``'s unconditional keys, in order, after ``StatusCode``.
ALWAYS_KEYS = (
    "PandaID",
    "prodSourceLabel",
    "swRelease",
    "homepackage",
    "transformation",
    "jobName",
    "jobDefinitionID",
    "cloud",
    "inFiles",
    "dispatchDblock",
    "dispatchDBlockToken",
    "dispatchDBlockTokenForOut",
    "outFiles",
    "destinationDblock",
    "destinationDBlockToken",
    "prodDBlocks",
    "prodDBlockToken",
    "realDatasets",
    "realDatasetsIn",
    "fileDestinationSE",
    "logFile",
    "logGUID",
    "jobPars",
    "attemptNr",
    "GUID",
    "checksum",
    "fsize",
    "scopeIn",
    "scopeOut",
    "scopeLog",
    "ddmEndPointIn",
    "ddmEndPointOut",
    "destinationSE",
    "prodUserID",
    "maxCpuCount",
    "minRamCount",
    "maxDiskCount",
    "cmtConfig",
    "processingType",
    "transferType",
    "sourceSite",
    "currentPriority",
    "taskID",
    "coreCount",
    "jobsetID",
    "reqID",
    "nucleus",
    "maxWalltime",
    "resource_type",
)
#: Conditional keys before ``ioIntensity`` (``debug`` comes from the job's debug flag).
FLAGS_BEFORE_IO = (
    "loopingCheck",
    "debug",
    "cloneJob",
    "eventService",
    "prodDBlockTokenForOutput",
    "eventServiceMerge",
    "writeToFile",
    "allowNoOutput",
    "altStageOut",
    "putLogToOS",
    "noExecStrCnv",
    "inFilePosEvtNum",
    "usePrefetcher",
    "container_name",
)
IO_KEYS = ("ioIntensity", "ioIntensityUnit")
FLAGS_AFTER_IO = ("isHPO", "useVP", "onSiteMerging")
#: Job fields pilots read when present (pilot3's job data), passed through as submitted:
#: the HPO steps as JSON text, the job's secrets (``pandasecrets``) as JSON text.
PASSTHROUGH_KEYS = ("preprocess", "coprocess", "postprocess", "secrets")

#: Flags sent as the string "True" when set.
_TRUE_FLAGS = frozenset(
    {
        "eventService",
        "eventServiceMerge",
        "putLogToOS",
        "noExecStrCnv",
        "inFilePosEvtNum",
        "usePrefetcher",
        "isHPO",
        "useVP",
        "onSiteMerging",
    }
)
#: Flags carrying a string value.
_STRING_FLAGS = frozenset({"cloneJob", "writeToFile", "altStageOut", "container_name"})

_INPUT_FIELDS = (
    "dispatchDblock",
    "dispatchDBlockToken",
    "prodDBlocks",
    "prodDBlockToken",
    "realDatasetsIn",
    "GUID",
    "checksum",
    "fsize",
    "scopeIn",
    "ddmEndPointIn",
)
_OUTPUT_FIELDS = (
    "destinationDblock",
    "destinationDBlockToken",
    "realDatasets",
    "fileDestinationSE",
    "dispatchDBlockTokenForOut",
    "ddmEndPointOut",
)
_STRING_FIELDS = (
    "prodSourceLabel",
    "swRelease",
    "homepackage",
    "transformation",
    "jobName",
    "cloud",
    "jobPars",
    "destinationSE",
    "prodUserID",
    "cmtConfig",
    "processingType",
    "transferType",
    "sourceSite",
    "nucleus",
    "resource_type",
    "computingSite",
    "logFile",
    "logGUID",
    "scopeLog",
)
#: Numeric columns; the first group defaults to 0, the second to NULL.
_ZERO_INTS = ("attemptNr", "maxCpuCount", "minRamCount", "maxDiskCount", "currentPriority", "jobExecutionID")
_NULL_INTS = ("PandaID", "jobDefinitionID", "taskID", "jobsetID", "reqID", "maxWalltime", "coreCount")
_ALIASES = {"AtlasRelease": "swRelease", "jobParameters": "jobPars", "jediTaskID": "taskID"}
_OTHER_KEYS = frozenset(
    {"inFiles", "outFiles", "scopeOut", "prodDBlockTokenForOutput", "debug", "ioIntensity", "ioIntensityUnit"}
)

ACCEPTED_KEYS = frozenset(
    {
        *_STRING_FIELDS,
        *_ZERO_INTS,
        *_NULL_INTS,
        *_INPUT_FIELDS,
        *_OUTPUT_FIELDS,
        *_ALIASES,
        *_OTHER_KEYS,
        *_TRUE_FLAGS,
        *_STRING_FLAGS,
        "loopingCheck",
        "allowNoOutput",
        *PASSTHROUGH_KEYS,
        "esRanges",
    }
)

#: Most ranges one development job may ask for (the table is SQLite on the developer's disk).
MAX_ES_RANGES = 100_000


class JobDefinitionError(ValueError):
    """A submitted job cannot be turned into a PanDA job definition."""


@dataclass(frozen=True)
class EventRangeSpec:
    """The dev-only ``esRanges`` field: how JEDI would have split the job's first input file."""

    count: int
    events_per_range: int = 1
    first_event: int = 1
    #: JEDI counts a range's attempts down; a range is handed out while it is above 0.
    attempt_nr: int = 10


@dataclass(frozen=True)
class JobDefinition:
    """A complete job: the indexed columns the dispatcher selects on, plus the wire fields."""

    panda_id: int | None
    computing_site: str
    prod_source_label: str
    resource_type: str
    processing_type: str
    min_ram_count: int
    max_disk_count: int
    max_walltime: int | None
    core_count: int
    current_priority: int
    attempt_nr: int
    job_execution_id: int
    jedi_task_id: int | None
    prod_user_id: str
    prod_user_name: str
    debug: bool
    #: ``appendJob`` values except StatusCode/PandaID/attemptNr/debug, plus the conditional flags.
    wire: dict[str, object]
    #: The event ranges to create for an event-service job (``esRanges``), never on the wire.
    es_ranges: EventRangeSpec | None = None


def normalise_job(
    raw: Mapping[str, object],
    *,
    submitter_dn: str,
    default_site: str | None = None,
    new_uuid: Callable[[], uuid.UUID] = uuid.uuid4,
) -> JobDefinition:
    """Complete a submitted job dict; raises ``JobDefinitionError`` with a readable reason."""
    job = dict(raw)
    for alias, name in _ALIASES.items():
        if alias in job:
            if name in job:
                raise JobDefinitionError(f"both {alias!r} and {name!r} given")
            job[name] = job.pop(alias)
    unknown = sorted(set(job) - ACCEPTED_KEYS)
    if unknown:
        raise JobDefinitionError(f"unknown job field(s): {', '.join(unknown)}")

    site = _string(job, "computingSite", default_site)
    if not site or site == "NULL":
        raise JobDefinitionError("computingSite is required (no single default queue is configured)")
    transformation = _string(job, "transformation", None)
    if not transformation:
        raise JobDefinitionError("transformation is required")
    ints = {name: _integer(job, name, None) or 0 for name in _ZERO_INTS}
    nullable = {name: _integer(job, name, None) for name in _NULL_INTS}
    core_count = nullable["coreCount"] if nullable["coreCount"] is not None else 1
    if core_count < 1:
        raise JobDefinitionError("coreCount must be at least 1")

    job_name = _string(job, "jobName", None) or f"panda-dev_{new_uuid()}"
    prod_user_id = _string(job, "prodUserID", None) or submitter_dn
    destination_se = _string(job, "destinationSE", None) or site
    wire: dict[str, object] = {
        "prodSourceLabel": _string(job, "prodSourceLabel", "managed"),
        "swRelease": _string(job, "swRelease", "NULL"),
        "homepackage": _string(job, "homepackage", "NULL"),
        "transformation": transformation,
        "jobName": job_name,
        "jobDefinitionID": nullable["jobDefinitionID"]
        if nullable["jobDefinitionID"] is not None
        else new_uuid().int % 100000,
        "cloud": _string(job, "cloud", "NULL"),
    }
    wire.update(_input_fields(job, new_uuid))
    outputs, n_outputs = _output_fields(
        job, job_name=job_name, destination_se=destination_se, new_uuid=new_uuid
    )
    wire.update(
        {
            "jobPars": _string(job, "jobPars", ""),
            "destinationSE": destination_se,
            "prodUserID": prod_user_id,
            "maxCpuCount": ints["maxCpuCount"],
            "minRamCount": ints["minRamCount"],
            "maxDiskCount": ints["maxDiskCount"],
            "cmtConfig": _string(job, "cmtConfig", "NULL"),
            "processingType": _string(job, "processingType", "NULL"),
            "transferType": _string(job, "transferType", "NULL"),
            "sourceSite": _string(job, "sourceSite", "NULL"),
            "currentPriority": ints["currentPriority"],
            "taskID": _null(nullable["taskID"]),
            "coreCount": core_count,
            "jobsetID": _null(nullable["jobsetID"]),
            "reqID": _null(nullable["reqID"]),
            "nucleus": _string(job, "nucleus", "NULL"),
            "maxWalltime": _null(nullable["maxWalltime"]),
            "resource_type": _string(job, "resource_type", "SCORE" if core_count == 1 else "MCORE"),
        }
    )
    wire.update(outputs)
    wire.update(_flags(job, outputs, n_outputs))
    for key in IO_KEYS:
        value = job.get(key)
        if value is not None and not isinstance(value, str | int | float):
            raise JobDefinitionError(f"{key} must be a string or a number")
        wire[key] = value
    for key in PASSTHROUGH_KEYS:
        value = job.get(key)
        if value is None:
            continue
        wire[key] = value if isinstance(value, str) else json.dumps(value)

    return JobDefinition(
        panda_id=nullable["PandaID"],
        computing_site=site,
        prod_source_label=str(wire["prodSourceLabel"]),
        resource_type=str(wire["resource_type"]),
        processing_type=str(wire["processingType"]),
        min_ram_count=ints["minRamCount"],
        max_disk_count=ints["maxDiskCount"],
        max_walltime=nullable["maxWalltime"],
        core_count=core_count,
        current_priority=ints["currentPriority"],
        attempt_nr=ints["attemptNr"],
        job_execution_id=ints["jobExecutionID"],
        jedi_task_id=nullable["taskID"],
        prod_user_id=prod_user_id,
        prod_user_name=clean_user_id(prod_user_id) or prod_user_id,
        debug=_boolean(job, "debug"),
        wire=wire,
        es_ranges=_es_ranges(job.get("esRanges"), "eventService" in wire),
    )


def render_job(
    wire: Mapping[str, object], *, panda_id: int, attempt_nr: int, debug: bool
) -> dict[str, object]:
    """The pilot's job dict, in ``appendJob`` order, starting with ``StatusCode: 0``."""
    job: dict[str, object] = {"StatusCode": 0}
    for key in ALWAYS_KEYS:
        if key == "PandaID":
            job[key] = panda_id
        elif key == "attemptNr":
            job[key] = attempt_nr
        else:
            job[key] = wire[key]
    for key in FLAGS_BEFORE_IO:
        if key == "debug":
            if debug:
                job["debug"] = "True"
        elif key in wire:
            job[key] = wire[key]
    for key in IO_KEYS:
        job[key] = wire.get(key)
    for key in FLAGS_AFTER_IO:
        if key in wire:
            job[key] = wire[key]
    for key in PASSTHROUGH_KEYS:
        if key in wire:
            job[key] = wire[key]
    return job


def split_list(value: object) -> list[str]:
    """A comma-joined wire value as a list (``""`` is the empty list)."""
    text = "" if value is None else str(value)
    return text.split(",") if text else []


# -- helpers -------------------------------------------------------------------------------------


def _string(job: Mapping[str, object], name: str, default: str | None) -> str:
    value = job.get(name)
    if value is None:
        return default if default is not None else ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise JobDefinitionError(f"{name} must be a string")
    return str(value)


def _integer(job: Mapping[str, object], name: str, default: int | None) -> int | None:
    value = job.get(name)
    if value is None or value == "NULL":
        return default
    if isinstance(value, bool):
        raise JobDefinitionError(f"{name} must be an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    raise JobDefinitionError(f"{name} must be an integer, got {value!r}")


def _null(value: int | None) -> object:
    return "NULL" if value is None else value


def _es_ranges(value: object, event_service: bool) -> EventRangeSpec | None:
    """``esRanges`` checked: counts are integers, and only an event-service job has ranges."""
    if value is None:
        return None
    if not event_service:
        raise JobDefinitionError("esRanges is only for eventService jobs")
    if not isinstance(value, dict):
        raise JobDefinitionError("esRanges must be an object {count, eventsPerRange, firstEvent, attemptNr}")
    unknown = sorted(set(value) - {"count", "eventsPerRange", "firstEvent", "attemptNr"})
    if unknown:
        raise JobDefinitionError(f"unknown esRanges field(s): {', '.join(unknown)}")
    limits = {"count": (1, MAX_ES_RANGES), "eventsPerRange": (1, 10**6), "firstEvent": (0, 2**40)}
    limits["attemptNr"] = (1, 1000)
    numbers: dict[str, int] = {}
    for name, (low, high) in limits.items():
        number = value.get(name)
        if number is None and name != "count":
            continue
        if isinstance(number, bool) or not isinstance(number, int) or not low <= number <= high:
            raise JobDefinitionError(
                f"esRanges.{name} must be an integer from {low} to {high}, got {number!r}"
            )
        numbers[name] = number
    spec = EventRangeSpec(numbers["count"])
    return EventRangeSpec(
        count=spec.count,
        events_per_range=numbers.get("eventsPerRange", spec.events_per_range),
        first_event=numbers.get("firstEvent", spec.first_event),
        attempt_nr=numbers.get("attemptNr", spec.attempt_nr),
    )


def _boolean(job: Mapping[str, object], name: str) -> bool:
    value = job.get(name)
    if value is None or value is False or value in ("False", "false", "0", ""):
        return False
    if value is True or value in ("True", "true", "1"):
        return True
    raise JobDefinitionError(f"{name} must be true or false, got {value!r}")


def _items(job: Mapping[str, object], name: str) -> list[str] | None:
    """A per-file field given as a list or a comma-joined string (None when absent)."""
    value = job.get(name)
    if value is None:
        return None
    if isinstance(value, list | tuple):
        if not all(isinstance(item, str | int | float) and not isinstance(item, bool) for item in value):
            raise JobDefinitionError(f"{name} must be a list of strings")
        return [str(item) for item in value]
    if isinstance(value, str | int) and not isinstance(value, bool):
        return split_list(value)
    raise JobDefinitionError(f"{name} must be a list or a comma-separated string")


def _aligned(job: Mapping[str, object], name: str, count: int, default: Callable[[int], str]) -> list[str]:
    """A per-file field with one value per file (a single value applies to all files)."""
    values = _items(job, name)
    if values is None:
        return [default(i) for i in range(count)]
    if len(values) == 1 and count > 1:
        return values * count
    if len(values) != count:
        raise JobDefinitionError(f"{name} has {len(values)} value(s) for {count} file(s)")
    return values


def _input_fields(job: Mapping[str, object], new_uuid: Callable[[], uuid.UUID]) -> dict[str, object]:
    lfns = _items(job, "inFiles") or []
    n = len(lfns)
    datasets = _aligned(job, "realDatasetsIn", n, lambda i: "NULL")
    values = {
        "dispatchDblock": _aligned(job, "dispatchDblock", n, lambda i: "NULL"),
        "dispatchDBlockToken": _aligned(job, "dispatchDBlockToken", n, lambda i: "NULL"),
        "prodDBlocks": _aligned(job, "prodDBlocks", n, lambda i: datasets[i]),
        "prodDBlockToken": _aligned(job, "prodDBlockToken", n, lambda i: "NULL"),
        "realDatasetsIn": datasets,
        "GUID": _aligned(job, "GUID", n, lambda i: str(new_uuid())),
        "checksum": _aligned(job, "checksum", n, lambda i: "NULL"),
        "fsize": _aligned(job, "fsize", n, lambda i: "0"),
        "scopeIn": _aligned(job, "scopeIn", n, lambda i: "NULL"),
        "ddmEndPointIn": _aligned(job, "ddmEndPointIn", n, lambda i: ""),
    }
    wire: dict[str, object] = {"inFiles": ",".join(lfns)}
    wire.update({name: ",".join(items) for name, items in values.items()})
    return wire


def _output_fields(
    job: Mapping[str, object], *, job_name: str, destination_se: str, new_uuid: Callable[[], uuid.UUID]
) -> tuple[dict[str, object], int]:
    """The output and log fields (the log is the last output unless ``outFiles`` places it)."""
    outputs = _items(job, "outFiles") or []
    log_file = _string(job, "logFile", None) or f"{job_name}.job.log.tgz"
    if log_file not in outputs:
        outputs.append(log_file)
    if len(set(outputs)) != len(outputs):
        raise JobDefinitionError("outFiles lists a file twice")
    n = len(outputs)
    data_outputs = [lfn for lfn in outputs if lfn != log_file]
    dataset = f"panda.destDB.{new_uuid()}"
    destination = _aligned(job, "destinationDblock", n, lambda i: dataset)
    tokens = _aligned(job, "destinationDBlockToken", n, lambda i: "NULL")
    scope_out = _aligned(job, "scopeOut", len(data_outputs), lambda i: "NULL")
    fields: dict[str, object] = {
        "dispatchDBlockTokenForOut": ",".join(
            _aligned(job, "dispatchDBlockTokenForOut", n, lambda i: "NULL")
        ),
        "outFiles": ",".join(outputs),
        "destinationDblock": ",".join(destination),
        "destinationDBlockToken": ",".join(re.sub("^ddd:", "dst:", token) for token in tokens),
        "realDatasets": ",".join(_aligned(job, "realDatasets", n, lambda i: destination[i])),
        "fileDestinationSE": ",".join(_aligned(job, "fileDestinationSE", n, lambda i: destination_se)),
        "logFile": log_file,
        "logGUID": _string(job, "logGUID", None) or str(new_uuid()),
        "scopeOut": ",".join(scope_out),
        "scopeLog": _string(job, "scopeLog", "NULL"),
        "ddmEndPointOut": ",".join(_aligned(job, "ddmEndPointOut", n, lambda i: "")),
    }
    return fields, n


def _flags(job: Mapping[str, object], outputs: Mapping[str, object], n_outputs: int) -> dict[str, object]:
    flags: dict[str, object] = {}
    if "loopingCheck" in job and not _boolean(job, "loopingCheck") and job["loopingCheck"] is not None:
        flags["loopingCheck"] = False
    for name in _TRUE_FLAGS:
        if _boolean(job, name):
            flags[name] = "True"
    for name in _STRING_FLAGS:
        value = _string(job, name, None)
        if value and value != "NULL":
            flags[name] = value
    if "cloneJob" in flags and "eventService" in flags:
        raise JobDefinitionError("cloneJob and eventService exclude each other")
    if "eventService" in flags:
        tokens = _aligned(job, "prodDBlockTokenForOutput", n_outputs, lambda i: "NULL")
        flags["prodDBlockTokenForOutput"] = ",".join(tokens)
    elif "prodDBlockTokenForOutput" in job:
        raise JobDefinitionError("prodDBlockTokenForOutput is only sent for eventService jobs")
    no_output = _items(job, "allowNoOutput")
    if no_output:
        known = split_list(outputs["outFiles"])
        missing = [lfn for lfn in no_output if lfn not in known]
        if missing:
            raise JobDefinitionError(f"allowNoOutput names files not in outFiles: {', '.join(missing)}")
        flags["allowNoOutput"] = ",".join(no_output)
    return flags
