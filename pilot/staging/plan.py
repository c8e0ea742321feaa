"""From a job and the queue's configuration to transfers with ordered attempts.

Stage-in: for each input, the candidate endpoints are the job's ``ddmEndPointIn``
and the queue's ``astorages`` for ``read_lan`` then ``read_wan``; LAN endpoints come
first.  For each copytool of the activity (``acopytools``: ``pr``/``read_lan``,
then ``default``, then the queue's ``copytools``, then ``rucio``) and each endpoint,
every protocol of the endpoint whose scheme the tool speaks (and the queue's
``acopytools_schemas`` allow) gives one attempt, with the URL built from the
protocol and Rucio's deterministic path.  Rucio itself gets one attempt per file
(it chooses the replica).  The engine tries attempts in order.

Direct access (``transferType=direct``, or the queue's ``direct_access_lan/wan``)
copies nothing: the first remote-I/O URL (root, https, davs) goes to the payload.

Stage-out: outputs go to activity ``pw``, the log to ``pl`` (falling back to
``pw``); the endpoint is the job's ``ddmEndPointOut`` or the queue's ``astorages``;
further endpoints are tried only when alternative stage-out is allowed (the
job's ``altStageOut`` or the queue's ``params.allow_altstageout``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import Any

from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError
from pilot.model.job import Checksum, InputFile, Job, OutputFile
from pilot.queuedata import QueueData
from pilot.staging.registry import CopytoolRegistry
from pilot.staging.storage import StorageData
from pilot.staging.transfer import Attempt, Direction, TransferError
from pilot.staging.urls import check_scope, rucio_path
from pilot.util.records import record

REMOTE_IO_SCHEMES = ("root", "roots", "https", "davs")
NOT_FOR_DIRECT_ACCESS = (".tar", ".tgz", ".tar.gz", ".lib.tgz", ".zip", ".raw")


@record
class FileTransfer:
    """One file to move, its ordered attempts, and (after the engine ran) the outcome."""

    direction: Direction
    lfn: str
    scope: str
    guid: str
    local: Path
    size: int | None
    checksum: Checksum | None
    activity: str
    attempts: list[Attempt]
    dataset: str = ""
    token: str = ""
    is_log: bool = False
    done: bool = False
    used: Attempt | None = None
    remote_url: str = ""
    duration: float = 0.0
    tries: int = 0
    error: TransferError | None = None
    from_record: bool = False
    verified_remotely: bool = False


@record(frozen=True)
class DirectInput:
    """An input read remotely by the payload (no copy)."""

    lfn: str
    guid: str
    turl: str
    endpoint: str


@record(frozen=True)
class StageInPlan:
    transfers: list[FileTransfer] = field(default_factory=list)
    direct: list[DirectInput] = field(default_factory=list)


def _as_list(value: object) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list | tuple):
        return [str(v) for v in value if v]
    return []


def copytools_for(queuedata: QueueData, activities: Sequence[str]) -> list[str]:
    """The copytool names for the first of ``activities`` the queue configures."""
    for activity in activities:
        tools = _as_list(queuedata.acopytools.get(activity))
        if tools:
            return tools
    tools = _as_list(queuedata.acopytools.get("default"))
    if tools:
        return tools
    return list(queuedata.copytools) or ["rucio"]


def _allowed_schemes(queuedata: QueueData, tool: str, activity: str) -> set[str] | None:
    schemas = queuedata.raw.get("acopytools_schemas")
    if not isinstance(schemas, Mapping):
        return None
    per_tool = schemas.get(tool)
    if isinstance(per_tool, Mapping):
        chosen = _as_list(per_tool.get(activity) or per_tool.get("default"))
    else:
        chosen = _as_list(per_tool)
    return set(chosen) or None


def _dedup(items: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    result = []
    for item in items:
        if item and item not in seen:
            seen.add(item)
            result.append(item)
    return result


def _url_attempts(
    tool_name: str,
    schemes: frozenset[str],
    endpoint_name: str,
    activities: Sequence[str],
    relative: str,
    storage: StorageData,
    allowed: set[str] | None,
    domain: str,
    flat: str | None = None,
) -> list[Attempt]:
    """``flat``: the name to use on a non-deterministic endpoint (files by LFN in one
    directory, as Harvester and ARC place inputs); without it such an endpoint is skipped."""
    endpoint = storage.get(endpoint_name)
    if endpoint is None:
        return []
    if not endpoint.is_deterministic:
        if flat is None:
            return []
        relative = flat
    for activity in activities:
        protocols = endpoint.protocols_for(activity)
        if protocols:
            break
    attempts = []
    for protocol in protocols:
        if protocol.scheme in schemes and (allowed is None or protocol.scheme in allowed):
            attempts.append(
                Attempt(tool_name, protocol.url(relative), endpoint.name, domain, protocol.settings)
            )
    return attempts


def _wants_direct_access(job: Job, spec: InputFile, queuedata: QueueData, domain: str) -> bool:
    if spec.storage_token == "local" or spec.lfn.endswith(NOT_FOR_DIRECT_ACCESS):
        return False
    if job.transfer_type == "direct":
        return True
    return queuedata.direct_access_lan if domain == "lan" else queuedata.direct_access_wan


def plan_stage_in(
    job: Job, workdir: Path, queuedata: QueueData, storage: StorageData, registry: CopytoolRegistry
) -> StageInPlan:
    lan = _as_list(queuedata.astorages.get("read_lan"))
    wan = _as_list(queuedata.astorages.get("read_wan"))
    tool_names = copytools_for(queuedata, ("pr", "read_lan"))
    tools = [registry.get(name) for name in tool_names]
    plan = StageInPlan()
    for spec in job.inputs:
        scope = check_scope(spec.scope, ErrorCode.STAGEINFAILED) if spec.scope else ""
        endpoints = _dedup([spec.ddm_endpoint, *lan, *wan])
        ordered = [e for e in endpoints if e in lan or (not lan and e == spec.ddm_endpoint)]
        ordered += [e for e in endpoints if e not in ordered]
        relative = rucio_path(scope, spec.lfn) if scope else spec.lfn
        attempts: list[Attempt] = []
        for tool in tools:
            if tool.resolves_replicas:
                if scope:
                    attempts.append(Attempt(tool.name, f"{scope}:{spec.lfn}", "", "lan"))
                continue
            for endpoint in ordered:
                domain = "lan" if endpoint in lan or (not lan and endpoint == spec.ddm_endpoint) else "wan"
                activities = ("read_lan", "read_wan") if domain == "lan" else ("read_wan", "read_lan")
                allowed = _allowed_schemes(queuedata, tool.name, activities[0])
                attempts += _url_attempts(
                    tool.name,
                    tool.schemes,
                    endpoint,
                    activities,
                    relative,
                    storage,
                    allowed,
                    domain,
                    spec.lfn,
                )
        direct = next(
            (
                a
                for a in attempts
                if not registry.get(a.tool).resolves_replicas
                and a.remote.split("://", 1)[0] in REMOTE_IO_SCHEMES
                and _wants_direct_access(job, spec, queuedata, a.domain)
            ),
            None,
        )
        if direct is not None:
            plan.direct.append(DirectInput(spec.lfn, spec.guid, direct.remote, direct.endpoint))
            continue
        if not attempts:
            code = (
                ErrorCode.NOSTORAGEPROTOCOL if any(storage.get(e) for e in ordered) else ErrorCode.NOSTORAGE
            )
            raise PilotError(
                code, f"no way to fetch {spec.lfn}: endpoints {ordered or 'none'}, copytools {tool_names}"
            )
        plan.transfers.append(
            FileTransfer(
                direction=Direction.IN,
                lfn=spec.lfn,
                scope=scope,
                guid=spec.guid,
                local=workdir / spec.lfn,
                size=spec.size,
                checksum=spec.checksum,
                activity="pr",
                attempts=attempts,
                dataset=spec.dataset,
                token=spec.storage_token,
            )
        )
    return plan


def stage_out_configured(queuedata: QueueData, storage: StorageData) -> bool:
    """Whether the queue says where outputs go (without it, outputs stay local, as in dev runs)."""
    return queuedata.stores_outputs


def alt_stageout_allowed(job: Job, queuedata: QueueData) -> bool:
    flag = str(job.raw.get("altStageOut", "")).lower()
    if flag in ("on", "true", "force"):
        return True
    if flag == "off":
        return False
    value: Any = queuedata.params.get("allow_altstageout")
    return value in (True, "true", "True", 1, "1")


def plan_stage_out(
    job: Job,
    files: Sequence[tuple[OutputFile, Path, Checksum, int]],
    queuedata: QueueData,
    storage: StorageData,
    registry: CopytoolRegistry,
    *,
    activities: tuple[str, ...] | None = None,
) -> list[FileTransfer]:
    """Transfers for ``files`` (spec, local path, local adler32, size); outputs and/or the log.

    ``activities`` overrides the storage activities, best first (event-service archives
    go to ``es_events``, then ``es_failover``, then where outputs go).
    """
    alternatives = alt_stageout_allowed(job, queuedata)
    transfers = []
    chosen = activities
    for spec, path, checksum, size in files:
        if chosen is not None:
            activity, kinds = chosen[0], chosen
        else:
            activity = "pl" if spec.is_log else "pw"
            kinds = ("pl", "pw") if spec.is_log else ("pw", "write_lan")
        scope = check_scope(spec.scope, ErrorCode.STAGEOUTFAILED) if spec.scope else ""
        if not scope:
            raise PilotError(ErrorCode.STAGEOUTFAILED, f"no scope for {spec.lfn}")
        configured = next(
            (_as_list(queuedata.astorages.get(a)) for a in kinds if queuedata.astorages.get(a)), []
        )
        endpoints = _dedup([spec.ddm_endpoint if storage.get(spec.ddm_endpoint) else "", *configured])
        if not alternatives:
            endpoints = endpoints[:1]
        tool_names = copytools_for(queuedata, kinds)
        tools = [registry.get(name) for name in tool_names]
        relative = rucio_path(scope, spec.lfn)
        attempts: list[Attempt] = []
        for endpoint in endpoints:
            for tool in tools:
                if tool.resolves_replicas:
                    attempts.append(Attempt(tool.name, endpoint, endpoint, "lan"))
                    continue
                allowed = _allowed_schemes(queuedata, tool.name, "write_lan")
                attempts += _url_attempts(
                    tool.name,
                    tool.schemes,
                    endpoint,
                    ("write_lan", "write_wan"),
                    relative,
                    storage,
                    allowed,
                    "lan",
                )
        if not attempts:
            code = ErrorCode.NOSTORAGEPROTOCOL if endpoints else ErrorCode.NOSTORAGE
            raise PilotError(
                code, f"no way to store {spec.lfn}: endpoints {endpoints or 'none'}, copytools {tool_names}"
            )
        first = storage.get(attempts[0].endpoint)
        token = first.token if first is not None else ""
        transfers.append(
            FileTransfer(
                direction=Direction.OUT,
                lfn=spec.lfn,
                scope=scope,
                guid=spec.guid,
                local=path,
                size=size,
                checksum=checksum,
                activity=activity,
                attempts=attempts,
                dataset=spec.dataset,
                token=token,
                is_log=spec.is_log,
            )
        )
    return transfers
