"""The pilot-facing methods of both API generations.

Each handler does what the real server's method does with its (already bound)
parameters before it reaches the database: the legacy methods convert strings the
way ``JobDispatcher.getJob/updateJob`` do (a conversion the server does not guard
fails the request with an HTTP 500 carrying the exception text), the v1 methods
follow ``api/v1/pilot_api.py``.  The job logic itself is the ``Dispatcher``'s.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable, Mapping

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pilot.devserver import protocol
from pilot.devserver.auth import Authenticator, Identity
from pilot.devserver.dispatcher import AcquireRequest, Dispatcher, UpdateResult
from pilot.devserver.event_api import LEGACY_EVENT_METHODS, EventAPI
from pilot.devserver.protocol import (
    MESSAGE_NO_ROLE,
    MESSAGE_PROD_ROLE,
    MESSAGE_SSL,
    SC_INVALID,
    SC_NO_JOBS,
    SC_ROLE,
    SC_SUCCESS,
    Params,
    RawRequest,
    Reply,
    Route,
    V1Rejected,
)
from pilot.devserver.store import JobStore
from pilot.devserver.updates import PilotUpdate

log = Logger()


class PilotAPI:
    """Legacy ``/server/panda/<method>`` and ``/api/v1/<module>/<method>`` for pilots."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        store: JobStore,
        authenticator: Authenticator,
        clock: IReactorTime,
        events: EventAPI,
    ) -> None:
        self._dispatcher = dispatcher
        self._store = store
        self._auth = authenticator
        self._clock = clock
        self._events = events

    async def handle(
        self, route: Route, request: RawRequest, identity: Identity
    ) -> tuple[Reply, Params | None]:
        """The reply for an already routed and authenticated request, and its decoded parameters.

        Exceptions are the server's HTTP 500s (the caller turns them into ``str(exc)``).
        """
        if route.generation == "legacy":
            legacy_params = protocol.parse_legacy_params(request)
            return await self._legacy(route.method, request, identity, legacy_params), legacy_params
        params = protocol.parse_v1_params(request, route.module, route.method)
        response = await self._v1(route, request, identity, params)
        return protocol.encode_v1(response, request.v1_json_reply), params

    # -- legacy -------------------------------------------------------------------------------

    async def _legacy(self, method: str, request: RawRequest, identity: Identity, params: Params) -> Reply:
        args = protocol.bind_legacy(method, params)
        accept_json = request.legacy_accepts_json
        if method in LEGACY_EVENT_METHODS:
            return await self._events.legacy(method, identity, args, accept_json)
        if method == "getJob":
            data = await self._legacy_get_job(identity, args, accept_json)
        else:
            data = await self._legacy_update_job(identity, args, params, accept_json)
        return protocol.encode_legacy(data, accept_json)

    async def _legacy_get_job(self, identity: Identity, args: Params, accept_json: bool) -> dict[str, object]:
        get_proxy_key = args["getProxyKey"] == "True"
        production = self._auth.production_legacy(identity, voms_patch=not get_proxy_key)
        prod_user_id = args["prodUserID"] if production else identity.dn
        label = args["prodSourceLabel"]
        if not production and label not in ["user"]:
            return protocol.legacy_response(SC_ROLE, MESSAGE_NO_ROLE if accept_json else None)
        _unguarded_int(args["timeout"])
        n_jobs = args["nJobs"]
        request = AcquireRequest(
            site=str(args["siteName"]),
            n_jobs=_int_or(n_jobs, 1),
            prod_source_label=_optional_str(label),
            memory=max(0, _int_or(args["mem"], 0, via_float=True)),
            disk_space=max(0, _int_or(args["diskSpace"], 0, via_float=True)),
            remaining_time=max(0, _int_or(args["remaining_time"], 0)),
            resource_type=_optional_str(args["resourceType"]),
            prod_user_id=_optional_str(prod_user_id),
            task_id=args["taskID"],
            computing_element=_optional_str(args["computingElement"]),
            node=_optional_str(args["node"]),
            scheduler_id=_optional_str(args["schedulerID"]),
            background=args["background"] == "True",
            job_type=_optional_str(args["jobType"]),
            get_proxy_key=get_proxy_key and production,
        )
        jobs, n_sent = await self._dispatcher.acquire(request)
        if not jobs:
            return protocol.legacy_response(SC_NO_JOBS, "no jobs in PanDA" if accept_json else None)
        for job in jobs:
            _add_dispatch_fields(job, n_sent, request.get_proxy_key)
        if n_jobs is None:
            return jobs[-1]
        bulk = protocol.legacy_response(SC_SUCCESS)
        bulk["jobs"] = jobs if accept_json else json.dumps(jobs)
        return bulk

    async def _legacy_update_job(
        self, identity: Identity, args: Params, received: Params, accept_json: bool
    ) -> dict[str, object]:
        if not self._auth.production_legacy(identity):
            return protocol.legacy_response(SC_ROLE, MESSAGE_NO_ROLE if accept_json else None)
        job_id, state = args["jobId"], args["state"]
        if job_id == "NULL":
            return protocol.legacy_response(SC_SUCCESS)
        if state not in VALID_STATES:
            await self._record_invalid(job_id, state, "legacy", received)
            return protocol.legacy_response(SC_SUCCESS)
        params = legacy_update_params(args)
        attempt_nr = _int_or_none(args["attemptNr"])
        stdout = args["stdout"]
        if stdout != "":
            stdout = stdout[:2048]  # type: ignore[index]
        update = PilotUpdate(
            panda_id=_unguarded_int(job_id),
            state=str(state),
            api="legacy",
            raw=received,
            params=params,
            attempt_nr=attempt_nr,
            report=_text(args["xml"]),
            metadata=_text(args["metaData"]),
            stdout=_text(stdout),
            pilot_log=_text(args["pilotLog"]),
        )
        _unguarded_int(args["timeout"])
        result = await self._dispatcher.update(update)
        if result.metadata_failed:
            return protocol.legacy_response(SC_SUCCESS)
        if result.database_error:
            return protocol.legacy_response(protocol.SC_FAILED)
        data = protocol.legacy_response(SC_SUCCESS)
        data["command"] = result.command if result.command is not None else "NULL"
        if result.secrets:
            data["pilotSecrets"] = result.secrets
        return data

    async def _record_invalid(self, job_id: object, state: object, api: str, args: Params) -> None:
        """Invalid states are answered without touching the job, but still recorded as received."""
        panda_id = _int_or_none(job_id)
        if panda_id is None:
            return
        await self._dispatcher.update(PilotUpdate(panda_id=panda_id, state=str(state), api=api, raw=args))

    # -- v1 -----------------------------------------------------------------------------------

    async def _v1(
        self, route: Route, request: RawRequest, identity: Identity, params: Params
    ) -> dict[str, object]:
        endpoint = protocol.V1_ENDPOINTS[(route.module, route.method)]
        if endpoint.secure and not identity.secure_v1:
            return protocol.v1_response(False, MESSAGE_SSL)
        if endpoint.production and not self._auth.production_v1(identity):
            return protocol.v1_response(False, MESSAGE_PROD_ROLE)
        try:
            args = protocol.validate_v1(endpoint, route.method, request.http_method, params)
        except V1Rejected as exc:
            return protocol.v1_response(False, str(exc))
        if route.module == "event":
            return await self._events.v1(route.method, args)
        if route.method == "acquire_jobs":
            return await self._acquire_jobs(identity, args)
        if route.method == "update_job":
            return await self._update_job(args, params)
        if route.method == "get_job_status":
            return await self._get_job_status(args)
        if route.method == "update_worker_node":
            return await self._update_worker_node(args)
        if route.method == "update_worker_node_gpu":
            return await self._update_worker_node_gpu(args)
        return protocol.v1_response(True)  # system/is_alive

    async def _acquire_jobs(self, identity: Identity, args: Params) -> dict[str, object]:
        production = self._auth.production_v1(identity)
        label = args["prod_source_label"]
        if not production and label not in ["user"]:
            return protocol.v1_response(False, MESSAGE_NO_ROLE)
        prod_user_id = args["prod_user_id"] if production else identity.dn
        target = args["target_architecture"]
        if target:
            if isinstance(target, str):
                try:
                    target = json.loads(target)
                except ValueError as exc:
                    return protocol.v1_response(False, f"failed to parse target_architecture with {exc}")
            if not isinstance(target, dict):
                return protocol.v1_response(False, "target_architecture must be a JSON object")
        request = AcquireRequest(
            site=str(args["site_name"]),
            n_jobs=_v1_int(args["n_jobs"]),
            prod_source_label=_optional_str(label),
            memory=_non_negative(args["memory"]),
            disk_space=_non_negative(args["disk_space"]),
            remaining_time=_non_negative(args["remaining_time"]),
            resource_type=_optional_str(args["resource_type"]),
            prod_user_id=_optional_str(prod_user_id),
            task_id=args["task_id"],
            computing_element=_optional_str(args["computing_element"]),
            node=_optional_str(args["node"]),
            scheduler_id=_optional_str(args["scheduler_id"]),
            background=args["background"] is True,
            job_type=_optional_str(args["job_type"]),
            get_proxy_key=bool(args["get_proxy_key"]) and production,
        )
        jobs, n_sent = await self._dispatcher.acquire(request)
        if not jobs:
            return protocol.v1_response(False, "No jobs in PanDA")
        for job in jobs:
            _add_dispatch_fields(job, n_sent, request.get_proxy_key)
        data = protocol.legacy_response(SC_SUCCESS)
        data["jobs"] = jobs
        return protocol.v1_response(True, data=data)

    async def _update_job(self, args: Params, received: Params) -> dict[str, object]:
        job_id, status = args["job_id"], args["job_status"]
        if status not in VALID_STATES:
            await self._record_invalid(job_id, status, "v1", received)
            return protocol.v1_response(
                False, f"Invalid job status: {status}", protocol.legacy_response(SC_INVALID)
            )
        attempt_nr = args["attempt_nr"]
        update = PilotUpdate(
            panda_id=_unguarded_int(job_id),
            state=str(status),
            api="v1",
            raw=received,
            params=v1_update_params(args),
            attempt_nr=attempt_nr if isinstance(attempt_nr, int) else None,
            report=_text(args["job_output_report"]),
            metadata=_text(args["meta_data"]),
            stdout=_text(args["stdout"]),
            pilot_log=_text(args["pilot_log"]),
        )
        result = await self._dispatcher.update(update)
        return _v1_update_reply(result)

    async def _get_job_status(self, args: Params) -> dict[str, object]:
        ids = args["job_ids"]
        assert isinstance(ids, list)
        statuses = await self._dispatcher.job_status(ids)
        data = [
            {"job_id": panda_id, "status": status, "attempt_number": attempt}
            if status is not None
            else {"job_id": panda_id, "status": "not found", "attempt_number": 0}
            for panda_id, status, attempt in statuses
        ]
        return protocol.v1_response(True, data=data)

    async def _update_worker_node(self, args: Params) -> dict[str, object]:
        await self._store.worker_node(
            str(args["site"]), _host(args["host_name"]), str(args["cpu_model"]), args, self._clock.seconds()
        )
        return protocol.v1_response(True, "Inserted new worker node.")

    async def _update_worker_node_gpu(self, args: Params) -> dict[str, object]:
        known = await self._store.worker_node_gpu(
            str(args["site"]),
            _host(args["host_name"]),
            str(args["vendor"]),
            str(args["model"]),
            args,
            self._clock.seconds(),
        )
        message = "Updated existing worker node GPU." if known else "Inserted new worker node GPU."
        return protocol.v1_response(True, message)


VALID_STATES = ("running", "failed", "finished", "holding", "starting", "transferring")


def _v1_update_reply(result: UpdateResult) -> dict[str, object]:
    if result.metadata_failed:
        message = "Failed to add meta_data"
        return protocol.v1_response(True, message, {"StatusCode": protocol.SC_FAILED, "ErrorDiag": message})
    if result.database_error:
        return protocol.v1_response(True, "Database error", protocol.legacy_response(protocol.SC_FAILED))
    data: dict[str, object] = {"StatusCode": SC_SUCCESS}
    if result.secrets:
        data["pilotSecrets"] = result.secrets
    data["command"] = result.command
    return protocol.v1_response(True, data=data)


def _add_dispatch_fields(job: dict[str, object], n_sent: int, proxy_key: bool) -> None:
    job["nSent"] = n_sent
    if proxy_key:
        job["credname"] = ""
        job["myproxy"] = ""


# -- parameter conversions -------------------------------------------------------------------------


def legacy_update_params(args: Params) -> dict[str, object]:
    """0.8.1 ``updateJob``'s ``param`` map.  Unguarded conversions raise, as on the server."""
    a: dict[str, object] = dict(args)
    param: dict[str, object] = {}
    if a["cpuConsumptionTime"] not in [None, ""]:
        param["cpuConsumptionTime"] = a["cpuConsumptionTime"]
    if a["cpuConsumptionUnit"] is not None:
        param["cpuConsumptionUnit"] = a["cpuConsumptionUnit"]
    if a["cpu_architecture_level"]:
        try:
            param["cpu_architecture_level"] = _cut(a["cpu_architecture_level"], 20)
        except TypeError:
            pass
    _set_cut(param, "modificationHost", a["node"], 128)
    for key in ("transExitCode", "pilotErrorCode"):
        if a[key] is not None:
            try:
                int(a[key])  # type: ignore[call-overload]
                param[key] = a[key]
            except (TypeError, ValueError):
                pass
    _set_cut(param, "pilotErrorDiag", a["pilotErrorDiag"], 500)
    _set_cut(param, "jobMetrics", a["jobMetrics"], 500)
    _set(param, "schedulerID", a["schedulerID"])
    _set_cut(param, "pilotID", a["pilotID"], 200)
    _set_cut(param, "batchID", a["batchID"], 80)
    _set(param, "exeErrorCode", a["exeErrorCode"])
    _set_cut(param, "exeErrorDiag", a["exeErrorDiag"], 500)
    _set(param, "cpuConversion", a["cpuConversionFactor"])
    _set(param, "pilotTiming", a["pilotTiming"])
    _set(param, "nEvents", a["nEvents"])
    _set(param, "nInputFiles", a["nInputFiles"])
    if a["jobSubStatus"] not in [None, ""]:
        param["jobSubStatus"] = a["jobSubStatus"]
    if a["coreCount"] not in [None, ""]:
        param["actualCoreCount"] = a["coreCount"]
    if a["meanCoreCount"]:
        try:
            param["meanCoreCount"] = float(a["meanCoreCount"])  # type: ignore[arg-type]
        except (TypeError, ValueError):
            pass
    _set(param, "grid", a["grid"])
    _set(param, "sourceSite", a["source_site"])
    _set(param, "destinationSite", a["destination_site"])
    for key in ("maxRSS", "maxVMEM", "maxSWAP", "maxPSS"):
        _set(param, key, a[key])
    for key in ("avgRSS", "avgVMEM", "avgSWAP", "avgPSS"):
        if a[key] is not None:
            param[key] = int(float(a[key]))  # type: ignore[arg-type]
    for key in ("totRCHAR", "totWCHAR", "totRBYTES", "totWBYTES"):
        if a[key] is not None:
            param[key] = min(10**10 - 1, int(a[key]) / 1024)  # type: ignore[call-overload]
    for key in ("rateRCHAR", "rateWCHAR", "rateRBYTES", "rateWBYTES"):
        if a[key] is not None:
            param[key] = min(10**10 - 1, int(float(a[key])))  # type: ignore[arg-type]
    for key in ("startTime", "endTime"):
        parsed = _timestamp(a[key])
        if parsed is not None:
            param[key] = parsed
    _set(param, "corruptedFiles", a["corruptedFiles"])
    return param


def _cut_to(length: int) -> Callable[[object], object]:
    return lambda value: str(value)[:length]


def _to_int(value: object) -> object:
    return int(value)  # type: ignore[call-overload]


def _to_float(value: object) -> object:
    return float(value)  # type: ignore[arg-type]


def _float_int(value: object) -> object:
    return int(float(value))  # type: ignore[arg-type]


#: v1 ``update_job``: (server column, argument, conversion); failed conversions are only logged there.
_V1_FIELDS: tuple[tuple[str, str, Callable[[object], object]], ...] = (
    ("cpuConsumptionTime", "cpu_consumption_time", _to_int),
    ("cpuConsumptionUnit", "cpu_consumption_unit", str),
    ("cpu_architecture_level", "cpu_architecture_level", _cut_to(20)),
    ("modificationHost", "node", _cut_to(128)),
    ("transExitCode", "trans_exit_code", _to_int),
    ("pilotErrorCode", "pilot_error_code", _to_int),
    ("pilotErrorDiag", "pilot_error_diag", _cut_to(500)),
    ("jobMetrics", "job_metrics", _cut_to(500)),
    ("schedulerID", "scheduler_id", str),
    ("pilotID", "pilot_id", _cut_to(200)),
    ("batchID", "batch_id", _cut_to(80)),
    ("exeErrorCode", "exe_error_code", _to_int),
    ("exeErrorDiag", "exe_error_diag", _cut_to(500)),
    ("cpuConversion", "cpu_conversion_factor", _to_float),
    ("pilotTiming", "pilot_timing", str),
    ("nEvents", "n_events", _to_int),
    ("nInputFiles", "n_input_files", _to_int),
    ("jobSubStatus", "job_sub_status", str),
    ("actualCoreCount", "core_count", _to_int),
    ("meanCoreCount", "mean_core_count", _to_float),
    ("maxRSS", "max_rss", _to_int),
    ("maxVMEM", "max_vmem", _to_int),
    ("maxSWAP", "max_swap", _to_int),
    ("maxPSS", "max_pss", _to_int),
    ("avgRSS", "avg_rss", _float_int),
    ("avgVMEM", "avg_vmem", _float_int),
    ("avgSWAP", "avg_swap", _float_int),
    ("avgPSS", "avg_pss", _float_int),
    ("corruptedFiles", "corrupted_files", str),
    ("grid", "grid", str),
    ("sourceSite", "source_site", str),
    ("destinationSite", "destination_site", str),
)
_V1_FILE_METRICS = (
    ("totRCHAR", "tot_rchar"),
    ("totWCHAR", "tot_wchar"),
    ("totRBYTES", "tot_rbytes"),
    ("totWBYTES", "tot_wbytes"),
    ("rateRCHAR", "rate_rchar"),
    ("rateWCHAR", "rate_wchar"),
    ("rateRBYTES", "rate_rbytes"),
    ("rateWBYTES", "rate_wbytes"),
)


def v1_update_params(args: Mapping[str, object]) -> dict[str, object]:
    """1.0.4 ``update_job``'s ``param`` map (bad values are skipped with a log message)."""
    param: dict[str, object] = {}
    for key, name, conversion in _V1_FIELDS:
        value = args[name]
        if value in [None, ""]:
            continue
        try:
            param[key] = conversion(value)
        except (TypeError, ValueError):
            log.warn("invalid {key}={value!r} for update_job", key=key, value=value)
    for key, name in _V1_FILE_METRICS:
        value = args[name]
        if value is not None:
            try:
                param[key] = min(10**10 - 1, int(value) / 1024)  # type: ignore[call-overload]
            except (TypeError, ValueError):
                log.warn("invalid {key}={value!r} for update_job", key=key, value=value)
    for key, name in (("startTime", "start_time"), ("endTime", "end_time")):
        parsed = _timestamp(args[name])
        if parsed is not None:
            param[key] = parsed
    return param


def _set(param: dict[str, object], key: str, value: object) -> None:
    if value is not None:
        param[key] = value


def _cut(value: object, length: int) -> object:
    return value[:length]  # type: ignore[index]  # a non-sliceable value fails like on the server


def _set_cut(param: dict[str, object], key: str, value: object, length: int) -> None:
    if value is not None:
        param[key] = _cut(value, length)


def _timestamp(value: object) -> datetime.datetime | None:
    if value is None:
        return None
    try:
        return datetime.datetime(*time.strptime(str(value), "%Y-%m-%d %H:%M:%S")[:6])
    except ValueError:
        return None


def _int_or(value: object, default: int, *, via_float: bool = False) -> int:
    try:
        return int(float(value)) if via_float else int(value)  # type: ignore[arg-type,call-overload]
    except (TypeError, ValueError, OverflowError):
        return default


def _int_or_none(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload,no-any-return]
    except (TypeError, ValueError, OverflowError):
        return None


def _unguarded_int(value: object) -> int:
    """``int(value)`` where the server does not guard it: a bad value fails the request (HTTP 500)."""
    return int(value)  # type: ignore[call-overload,no-any-return]


def _v1_int(value: object) -> int:
    return int(value) if isinstance(value, int) else 1


def _non_negative(value: object) -> int:
    """``max(0, value)``, 0 when the server's ``max`` would fail (None, strings...)."""
    if isinstance(value, int | float):
        return max(0, int(value))
    return 0


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)


def _text(value: object) -> str:
    return "" if value is None else value if isinstance(value, str) else str(value)


def _host(value: object) -> str:
    """``clean_host_name``: ``slot1@wn.example.org`` is host ``wn.example.org``."""
    return str(value).split("@")[-1]
