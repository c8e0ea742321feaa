"""The PanDA server's pilot-facing method signatures, and how it binds and checks parameters.

The real server calls each method with the decoded parameters as keyword arguments, so
its signature *is* the parameter check:

* legacy ``/server/panda/<method>`` (panda-server 0.8.1 ``JobDispatcher.py``): an
  unknown or missing name raises the ``TypeError`` that becomes an HTTP 500 (the stubs
  below raise the very same message); values stay strings;
* ``/api/v1/<module>/<method>`` (panda-server 1.0.4 ``api/v1/*_api.py``):
  ``request_validation`` checks the HTTP method, binds the parameters and checks them
  against the annotations (casting GET query values first); a refusal is a
  ``success: false`` reply with the server's message (``V1Rejected``).
"""

from __future__ import annotations

import ast
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from types import UnionType
from typing import Union, get_args, get_origin

#: Values a parameter dict may hold after decoding (JSON values, or strings/lists of strings).
Params = dict[str, object]


# -- legacy method signatures (0.8.1 jobdispatcher/JobDispatcher.py) --------------------------------
# Calling these stubs with the decoded parameters raises the very TypeError the real
# server turns into an HTTP 500 (unknown or missing parameters).  They return nothing.


def getJob(
    req: object,
    siteName: object,
    token: object = None,
    timeout: object = 60,
    cpu: object = None,
    mem: object = None,
    diskSpace: object = None,
    prodSourceLabel: object = None,
    node: object = None,
    computingElement: object = None,
    AtlasRelease: object = None,
    prodUserID: object = None,
    getProxyKey: object = None,
    countryGroup: object = None,
    workingGroup: object = None,
    allowOtherCountry: object = None,
    taskID: object = None,
    nJobs: object = None,
    background: object = None,
    resourceType: object = None,
    harvester_id: object = None,
    worker_id: object = None,
    schedulerID: object = None,
    jobType: object = None,
    viaTopic: object = None,
    remaining_time: object = None,
) -> None:
    """Legacy ``getJob`` parameters (all strings on the wire)."""


def updateJob(
    req: object,
    jobId: object,
    state: object,
    token: object = None,
    transExitCode: object = None,
    pilotErrorCode: object = None,
    pilotErrorDiag: object = None,
    timestamp: object = None,
    timeout: object = 60,
    xml: object = "",
    node: object = None,
    workdir: object = None,
    cpuConsumptionTime: object = None,
    cpuConsumptionUnit: object = None,
    remainingSpace: object = None,
    schedulerID: object = None,
    pilotID: object = None,
    siteName: object = None,
    messageLevel: object = None,
    pilotLog: object = "",
    metaData: object = "",
    cpuConversionFactor: object = None,
    exeErrorCode: object = None,
    exeErrorDiag: object = None,
    pilotTiming: object = None,
    computingElement: object = None,
    startTime: object = None,
    endTime: object = None,
    nEvents: object = None,
    nInputFiles: object = None,
    batchID: object = None,
    attemptNr: object = None,
    jobMetrics: object = None,
    stdout: object = "",
    jobSubStatus: object = None,
    coreCount: object = None,
    maxRSS: object = None,
    maxVMEM: object = None,
    maxSWAP: object = None,
    maxPSS: object = None,
    avgRSS: object = None,
    avgVMEM: object = None,
    avgSWAP: object = None,
    avgPSS: object = None,
    totRCHAR: object = None,
    totWCHAR: object = None,
    totRBYTES: object = None,
    totWBYTES: object = None,
    rateRCHAR: object = None,
    rateWCHAR: object = None,
    rateRBYTES: object = None,
    rateWBYTES: object = None,
    corruptedFiles: object = None,
    meanCoreCount: object = None,
    cpu_architecture_level: object = None,
    grid: object = None,
    source_site: object = None,
    destination_site: object = None,
) -> None:
    """Legacy ``updateJob`` parameters (all strings on the wire, except in JSON bodies)."""


def getEventRanges(
    req: object,
    pandaID: object,
    jobsetID: object,
    taskID: object = None,
    nRanges: object = 10,
    timeout: object = 60,
    scattered: object = None,
    segment_id: object = None,
) -> None:
    """Legacy ``getEventRanges`` parameters."""


def updateEventRange(
    req: object,
    eventRangeID: object,
    eventStatus: object,
    coreCount: object = None,
    cpuConsumptionTime: object = None,
    objstoreID: object = None,
    timeout: object = 60,
    pandaID: object = None,
) -> None:
    """Legacy ``updateEventRange`` parameters (one range)."""


def updateEventRanges(
    req: object, eventRanges: object, timeout: object = 120, version: object = 0, pandaID: object = None
) -> None:
    """Legacy ``updateEventRanges`` parameters (``eventRanges`` is a JSON string)."""


def checkEventsAvailability(
    req: object, pandaID: object, jobsetID: object, taskID: object, timeout: object = 60
) -> None:
    """Legacy ``checkEventsAvailability`` parameters."""


LEGACY_METHODS: dict[str, Callable[..., None]] = {
    "getJob": getJob,
    "updateJob": updateJob,
    "getEventRanges": getEventRanges,
    "updateEventRange": updateEventRange,
    "updateEventRanges": updateEventRanges,
    "checkEventsAvailability": checkEventsAvailability,
}


def bind_legacy(method: str, params: Params) -> Params:
    """All of the method's parameters with defaults applied, or the server's ``TypeError``."""
    stub = LEGACY_METHODS[method]
    stub(None, **params)  # raises e.g. "getJob() got an unexpected keyword argument 'x'"
    bound = inspect.signature(stub).bind(None, **params)
    bound.apply_defaults()
    return {name: value for name, value in bound.arguments.items() if name != "req"}


# -- v1 endpoint signatures (1.0.4 api/v1/*_api.py) ------------------------------------------------

_REQUIRED = inspect.Parameter.empty
_UNTYPED = inspect.Parameter.empty
_Spec = tuple[str, object, object]  # (name, annotation, default)


def _signature(*specs: _Spec) -> inspect.Signature:
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter("req", kind)]
    params += [
        inspect.Parameter(name, kind, default=default, annotation=annotation)
        for name, annotation, default in specs
    ]
    return inspect.Signature(params)


def _numbers(*names: str) -> tuple[_Spec, ...]:
    return tuple((name, int | float, None) for name in names)


@dataclass(frozen=True)
class V1Endpoint:
    """One ``@request_validation``-decorated function: its requirements and signature."""

    secure: bool
    production: bool
    http_method: str | None
    signature: inspect.Signature


V1_ENDPOINTS: dict[tuple[str, str], V1Endpoint] = {
    ("pilot", "acquire_jobs"): V1Endpoint(
        True,
        False,
        "POST",
        _signature(
            ("site_name", str, _REQUIRED),
            ("timeout", int, 60),
            ("memory", int, None),
            ("disk_space", int, None),
            ("prod_source_label", str, None),
            ("node", str, None),
            ("computing_element", str, None),
            ("prod_user_id", str, None),
            ("get_proxy_key", str, None),
            ("task_id", int, None),
            ("n_jobs", int, 1),
            ("background", bool, None),
            ("resource_type", str, None),
            ("harvester_id", str, None),
            ("worker_id", int, None),
            ("scheduler_id", str, None),
            ("job_type", str, None),
            ("via_topic", bool, None),
            ("remaining_time", _UNTYPED, None),
            ("target_architecture", dict | str, None),
        ),
    ),
    ("pilot", "get_job_status"): V1Endpoint(
        True,
        False,
        "GET",
        _signature(("job_ids", typing.List[int], _REQUIRED), ("timeout", int, 60)),  # noqa: UP006 - the server's annotation
    ),
    ("pilot", "update_job"): V1Endpoint(
        True,
        True,
        "POST",
        _signature(
            ("job_id", int, _REQUIRED),
            ("job_status", str, _REQUIRED),
            ("job_output_report", str, ""),
            ("node", str, None),
            ("cpu_consumption_time", int, None),
            ("cpu_consumption_unit", str, None),
            ("scheduler_id", str, None),
            ("pilot_id", str, None),
            ("site_name", str, None),
            ("pilot_log", str, ""),
            ("meta_data", str, ""),
            ("cpu_conversion_factor", float | int, None),
            ("trans_exit_code", int, None),
            ("pilot_error_code", int, None),
            ("pilot_error_diag", str, None),
            ("exe_error_code", int, None),
            ("exe_error_diag", str, None),
            ("pilot_timing", str, None),
            ("start_time", str, None),
            ("end_time", str, None),
            ("n_events", int, None),
            ("n_input_files", int, None),
            ("batch_id", str, None),
            ("attempt_nr", int, None),
            ("job_metrics", str, None),
            ("stdout", str, ""),
            ("job_sub_status", str, None),
            ("core_count", int, None),
            *_numbers(
                "max_rss", "max_vmem", "max_swap", "max_pss", "avg_rss", "avg_vmem", "avg_swap", "avg_pss"
            ),
            *_numbers("tot_rchar", "tot_wchar", "tot_rbytes", "tot_wbytes"),
            *_numbers("rate_rchar", "rate_wchar", "rate_rbytes", "rate_wbytes"),
            ("corrupted_files", str, None),
            ("mean_core_count", int, None),
            ("cpu_architecture_level", str, None),
            ("grid", str, None),
            ("source_site", str, None),
            ("destination_site", str, None),
            ("timeout", int, 60),
        ),
    ),
    ("pilot", "update_worker_node"): V1Endpoint(
        True,
        True,
        "POST",
        _signature(
            ("site", str, _REQUIRED),
            ("host_name", str, _REQUIRED),
            ("cpu_model", str, _REQUIRED),
            ("panda_queue", str, None),
            ("n_logical_cpus", int, None),
            ("n_sockets", int, None),
            ("cores_per_socket", int, None),
            ("threads_per_core", int, None),
            ("cpu_architecture", str, None),
            ("cpu_architecture_level", str, None),
            ("clock_speed", float, None),
            ("total_memory", int, None),
            ("total_local_disk", int, None),
            ("timeout", int, 60),
        ),
    ),
    ("pilot", "update_worker_node_gpu"): V1Endpoint(
        True,
        True,
        "POST",
        _signature(
            ("site", str, _REQUIRED),
            ("host_name", str, _REQUIRED),
            ("vendor", str, _REQUIRED),
            ("model", str, _REQUIRED),
            ("count", int, _REQUIRED),
            ("vram", int, None),
            ("architecture", str, None),
            ("framework", str, None),
            ("framework_version", str, None),
            ("driver_version", str, None),
            ("timeout", int, 60),
        ),
    ),
    ("system", "is_alive"): V1Endpoint(False, False, "GET", _signature()),
    # api/v1/event_api.py; update_single_event_range's object_store_id is annotated with the
    # builtin ``id`` there, so any value but None breaks its type check (an HTTP 500)
    ("event", "acquire_event_ranges"): V1Endpoint(
        True,
        True,
        "POST",
        _signature(
            ("job_id", int, _REQUIRED),
            ("jobset_id", int, _REQUIRED),
            ("task_id", int, None),
            ("n_ranges", int, 10),
            ("timeout", int, 60),
            ("scattered", bool, False),
            ("segment_id", int, None),
        ),
    ),
    ("event", "update_single_event_range"): V1Endpoint(
        True,
        True,
        "POST",
        _signature(
            ("event_range_id", str, _REQUIRED),
            ("event_range_status", str, _REQUIRED),
            ("core_count", int, None),
            ("cpu_consumption_time", float, None),
            ("object_store_id", id, None),
            ("timeout", int, 60),
        ),
    ),
    ("event", "update_event_ranges"): V1Endpoint(
        True,
        True,
        "POST",
        _signature(("event_ranges", str, _REQUIRED), ("timeout", int, 120), ("version", int, 0)),
    ),
    ("event", "get_available_event_range_count"): V1Endpoint(
        True,
        True,
        "GET",
        _signature(
            ("job_id", int, _REQUIRED),
            ("jobset_id", int, _REQUIRED),
            ("task_id", int, _REQUIRED),
            ("timeout", _UNTYPED, 60),
        ),
    ),
    ("event", "get_event_range_statuses"): V1Endpoint(
        True, False, "GET", _signature(("job_task_ids", str, _REQUIRED))
    ),
}


class V1Rejected(Exception):
    """``request_validation`` refused the call: the reply is ``success: false`` with this message."""


def validate_v1(endpoint: V1Endpoint, method: str, http_method: str, params: Params) -> Params:
    """Steps 3-5 of ``request_validation``: HTTP method, binding, type check (and GET casts).

    Returns the bound arguments (defaults applied, GET values cast).  Raises
    ``V1Rejected`` for the server's ``success: false`` replies; other exceptions are
    the server's HTTP 500s (for instance ``int | float`` annotations have no
    ``__name__``, so a wrongly typed value there fails while building the message).
    """
    if endpoint.http_method and endpoint.http_method != http_method:
        raise V1Rejected(f"expecting {endpoint.http_method}, received {http_method}")
    if "req" in params:
        raise TypeError(f"{method}() got multiple values for argument 'req'")
    try:
        bound = endpoint.signature.bind(None, **params)
    except TypeError as exc:
        raise V1Rejected(f"Argument error: {exc}") from None
    bound.apply_defaults()
    for name, value in list(bound.arguments.items()):
        if name == "req":
            continue
        parameter = endpoint.signature.parameters[name]
        expected: object = parameter.annotation
        default: object = parameter.default
        # like the server: values equal to the default, and unannotated parameters, are not checked
        if expected is inspect.Parameter.empty or default == value:
            continue
        if http_method == "GET":
            value = _cast_get_value(name, value, expected, default)
            bound.arguments[name] = value
        _check_type(name, value, expected, default)
    return {name: value for name, value in bound.arguments.items() if name != "req"}


def _type_name(annotation: object) -> str:
    # deliberately getattr: union annotations have no __name__ and the server fails right there
    name: str = getattr(annotation, "__name__")  # noqa: B009
    return name


def _cast_get_value(name: str, value: object, expected: object, default: object) -> object:
    """Query-string values arrive as strings; the server casts them to the annotation."""
    origin, args = get_origin(expected), get_args(expected)
    try:
        if value == "None" and default is None:
            return None
        if expected is str:
            return value
        if expected is bool:
            return _str_method(value, "lower")() in ("true", "1")
        if expected is int:
            return int(float(value))  # type: ignore[arg-type] # wrong types raise TypeError, as on the server
        if origin is list and args:
            if isinstance(value, str):
                value = [value]
            converters: dict[object, Callable[[object], object]] = {
                int: lambda item: int(float(item)),  # type: ignore[arg-type]
                float: lambda item: float(item),  # type: ignore[arg-type]
                bool: lambda item: _str_method(item, "lower")() in ("true", "1"),
            }
            convert = converters.get(args[0])
            if convert is None:
                return value
            return [convert(item) for item in value]  # type: ignore[attr-defined]
        if not isinstance(expected, type):
            raise TypeError(f"Expected {expected}, received {type(value)}")
        if not isinstance(value, expected):
            value = ast.literal_eval(value)  # type: ignore[arg-type]
        if not isinstance(value, expected):
            raise TypeError(f"Expected {expected}, received {type(value)}")
        return value
    except (ValueError, TypeError):
        raise V1Rejected(
            f"Type error: '{name}' with value '{value}' could not be casted to type "
            f"{_type_name(expected)} from {type(value).__name__}."
        ) from None


def _str_method(value: object, attribute: str) -> Callable[[], str]:
    method: Callable[[], str] = getattr(value, attribute)  # AttributeError for non-strings, like the server
    return method


def _check_type(name: str, value: object, expected: object, default: object) -> None:
    origin, args = get_origin(expected), get_args(expected)
    if origin is not None and origin is not Union and origin is not UnionType:
        assert isinstance(origin, type)
        if not isinstance(value, origin):
            raise V1Rejected(
                f"Type error: '{name}' must be of type {origin.__name__}, got {type(value).__name__}."
            )
        if args and origin is list and isinstance(value, list):
            element = args[0]
            assert isinstance(element, type)
            if not all(isinstance(item, element) for item in value):
                raise V1Rejected(f"Type error: All elements in '{name}' must be {element.__name__}.")
        return
    if not isinstance(value, expected) and not (value is None and value == default):  # type: ignore[arg-type]
        raise V1Rejected(
            f"Type error: '{name}' must be of type {_type_name(expected)}, got {type(value).__name__}."
        )
