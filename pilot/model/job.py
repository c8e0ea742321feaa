"""Typed PanDA jobs, built from the dictionary the server sends.

The server's job dictionary is a flat bag of strings: per-file attributes are
comma-joined lists aligned by position (``inFiles``, ``GUID``, ``fsize``, ...),
unset database columns arrive as the string ``"NULL"``, booleans as ``"True"``,
checksums as ``ad:<adler32>`` / ``md:<md5>``.  ``parse_job`` turns that into
immutable objects and rejects what cannot be run safely, with an error that names
the offending field and carries the PanDA error code the job is failed with.

The contract is also written down as a JSON Schema: ``interfaces/job-definition.schema.json``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import field
from typing import Any, Literal

from pilot.errorcodes import ErrorCode
from pilot.model.documents import Step, parse_secrets, parse_steps
from pilot.model.fields import JobDefinitionError, aligned, integer, listing, text
from pilot.model.jobpars import check_command_size, check_image, split_parameters
from pilot.model.names import check_lfn, check_scope
from pilot.util.records import record

__all__ = [
    "SECRET_KEYS",
    "Checksum",
    "InputFile",
    "Job",
    "JobDefinitionError",
    "OutputFile",
    "Step",
    "attempt_nr_of",
    "check_lfn",
    "panda_id_of",
    "parse_job",
]

#: Keys of the job definition that hold credentials.  They are kept out of logs,
#: summaries and anything else that leaves the pilot.
SECRET_KEYS = frozenset(
    {"secrets", "pilotSecrets", "credname", "myproxy", "userProxy", "privateKey", "publicKey"}
)


@record(frozen=True)
class Checksum:
    """A file checksum as PanDA states it: adler32 (8 hex digits) or md5 (32 hex digits)."""

    algorithm: Literal["adler32", "md5"]
    value: str

    @classmethod
    def parse(cls, text: str, field_name: str) -> Checksum:
        prefix, sep, rest = text.partition(":")
        if sep and prefix in ("ad", "adler32"):
            algorithm: Literal["adler32", "md5"] = "adler32"
            value = rest
        elif sep and prefix in ("md", "md5"):
            algorithm, value = "md5", rest
        elif not sep:
            algorithm, value = "adler32", text
        else:
            raise JobDefinitionError(
                ErrorCode.UNKNOWNCHECKSUMTYPE, field_name, f"unknown checksum type {prefix!r}"
            )
        value = value.strip().lower()
        if algorithm == "adler32":
            if not re.fullmatch(r"[0-9a-f]{1,8}", value):
                raise JobDefinitionError(
                    ErrorCode.UNKNOWNCHECKSUMTYPE, field_name, f"not an adler32 checksum: {text!r}"
                )
            value = value.zfill(8)
        elif not re.fullmatch(r"[0-9a-f]{32}", value):
            raise JobDefinitionError(
                ErrorCode.UNKNOWNCHECKSUMTYPE, field_name, f"not an md5 checksum: {text!r}"
            )
        return cls(algorithm, value)

    @property
    def report_key(self) -> str:
        """The key of this checksum in a job output report."""
        return "adler32" if self.algorithm == "adler32" else "md5sum"


@record(frozen=True)
class InputFile:
    lfn: str
    scope: str = ""
    guid: str = ""
    size: int | None = None
    checksum: Checksum | None = None
    dataset: str = ""
    ddm_endpoint: str = ""
    storage_token: str = ""
    dispatch_dblock: str = ""
    dispatch_dblock_token: str = ""
    prod_dblock: str = ""


@record(frozen=True)
class OutputFile:
    """An output of the job, or its log tarball (``is_log``, whose GUID is ``logGUID``)."""

    lfn: str
    scope: str = ""
    dataset: str = ""
    destination_dblock: str = ""
    destination_token: str = ""
    ddm_endpoint: str = ""
    destination_se: str = ""
    is_log: bool = False
    guid: str = ""


@record(frozen=True)
class Job:
    """A job as ``parse_job`` builds it: every field checked, the derived ones computed once."""

    panda_id: int
    transformation: str
    #: The job parameters exactly as the server sent them.
    job_pars: str = ""
    #: What the payload gets: ``job_pars`` without the pilot's ``--containerImage`` option.
    payload_args: str = ""
    #: The payload's image: ``--containerImage`` in ``jobPars``, else ``container_name``.
    container_image: str | None = None
    attempt_nr: int | None = None
    task_id: int | None = None
    jobset_id: int | None = None
    job_name: str = ""
    job_definition_id: int | None = None
    label: str = ""
    swrelease: str = ""
    homepackage: str = ""
    cmtconfig: str = ""
    processing_type: str = ""
    transfer_type: str = ""
    resource_type: str = ""
    core_count: int = 1
    max_walltime: int | None = None
    min_ram: int | None = None
    max_disk: int | None = None
    max_cpu: int | None = None
    inputs: tuple[InputFile, ...] = ()
    outputs: tuple[OutputFile, ...] = ()
    log: OutputFile | None = None
    flags: frozenset[str] = frozenset()
    #: ``preprocess``/``coprocess``/``postprocess`` by name (only those the job has).
    steps: Mapping[str, Step] = field(default_factory=dict)
    #: The user's own secrets (``secrets``), for the payload only; never logged.
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def flag(self, name: str) -> bool:
        """Whether the server set the ``"True"`` flag ``name`` (``debug``, ``eventService``...)."""
        return name in self.flags

    @property
    def is_debug(self) -> bool:
        return self.flag("debug")

    def loggable(self) -> dict[str, Any]:
        """The job definition without credentials, safe for logs and summaries."""
        return {k: v for k, v in self.raw.items() if k not in SECRET_KEYS}


def _parse_inputs(raw: Mapping[str, Any]) -> tuple[InputFile, ...]:
    lfns = listing(raw, "inFiles", checked=False)
    n = len(lfns)
    columns = {
        key: aligned(raw, key, "inFiles", n)
        for key in (
            "GUID",
            "fsize",
            "checksum",
            "scopeIn",
            "realDatasetsIn",
            "prodDBlockToken",
            "ddmEndPointIn",
            "dispatchDblock",
            "dispatchDBlockToken",
            "prodDBlocks",
        )
    }
    files: list[InputFile] = []
    seen: set[str] = set()
    for i, lfn in enumerate(lfns):
        if not lfn or lfn in seen:
            continue
        seen.add(lfn)
        check_lfn(lfn, f"inFiles[{i}]", ErrorCode.STAGEINFAILED)
        scope = columns["scopeIn"][i]
        if scope:
            check_scope(scope, f"scopeIn[{i}]")
        size_text = columns["fsize"][i]
        size = integer({f"fsize[{i}]": size_text}, f"fsize[{i}]")
        if size is not None and size < 0:
            raise JobDefinitionError(ErrorCode.CONVERSIONFAILURE, f"fsize[{i}]", f"negative size {size}")
        checksum_text = columns["checksum"][i]
        files.append(
            InputFile(
                lfn=lfn,
                scope=scope,
                guid=columns["GUID"][i],
                size=size,
                checksum=Checksum.parse(checksum_text, f"checksum[{i}]") if checksum_text else None,
                dataset=columns["realDatasetsIn"][i],
                ddm_endpoint=columns["ddmEndPointIn"][i],
                storage_token=columns["prodDBlockToken"][i],
                dispatch_dblock=columns["dispatchDblock"][i],
                dispatch_dblock_token=columns["dispatchDBlockToken"][i],
                prod_dblock=columns["prodDBlocks"][i],
            )
        )
    return tuple(files)


def _output_scopes(raw: Mapping[str, Any], lfns: Sequence[str], log_lfn: str) -> list[str]:
    """``scopeOut`` lists the scopes of the non-log outputs (the log has ``scopeLog``).

    Some servers list a scope for every entry of ``outFiles`` instead; both are accepted.
    """
    scopes = listing(raw, "scopeOut")
    for index, scope in enumerate(scopes):
        if scope:
            check_scope(scope, f"scopeOut[{index}]")
    log_scope = text(raw, "scopeLog")
    if log_scope:
        check_scope(log_scope, "scopeLog")
    non_log = [lfn for lfn in lfns if lfn != log_lfn]
    if not scopes:
        return [log_scope if lfn == log_lfn else "" for lfn in lfns]
    if len(scopes) == len(lfns):
        return [log_scope or s if lfn == log_lfn else s for lfn, s in zip(lfns, scopes, strict=True)]
    if len(scopes) == len(non_log):
        remaining = iter(scopes)
        return [log_scope if lfn == log_lfn else next(remaining) for lfn in lfns]
    raise JobDefinitionError(
        ErrorCode.NOTSAMELENGTH,
        "scopeOut",
        f"has {len(scopes)} entries but 'outFiles' has {len(non_log)} outputs besides the log",
    )


def _parse_outputs(raw: Mapping[str, Any]) -> tuple[tuple[OutputFile, ...], OutputFile | None]:
    lfns = listing(raw, "outFiles", checked=False)
    log_lfn = text(raw, "logFile", checked=False)
    if log_lfn:
        check_lfn(log_lfn, "logFile", ErrorCode.BADOUTPUTFILENAME)
    n = len(lfns)
    columns = {
        key: aligned(raw, key, "outFiles", n)
        for key in (
            "realDatasets",
            "destinationDblock",
            "destinationDBlockToken",
            "ddmEndPointOut",
            "fileDestinationSE",
        )
    }
    scopes = _output_scopes(raw, lfns, log_lfn)
    outputs: list[OutputFile] = []
    log: OutputFile | None = None
    seen: set[str] = set()
    for i, lfn in enumerate(lfns):
        if not lfn:
            continue
        check_lfn(lfn, f"outFiles[{i}]", ErrorCode.BADOUTPUTFILENAME)
        if lfn in seen:
            raise JobDefinitionError(
                ErrorCode.BADOUTPUTFILENAME, f"outFiles[{i}]", f"duplicate output {lfn!r}"
            )
        seen.add(lfn)
        spec = OutputFile(
            lfn=lfn,
            scope=scopes[i],
            dataset=columns["realDatasets"][i],
            destination_dblock=columns["destinationDblock"][i],
            destination_token=columns["destinationDBlockToken"][i],
            ddm_endpoint=columns["ddmEndPointOut"][i],
            destination_se=columns["fileDestinationSE"][i],
            is_log=lfn == log_lfn,
            guid=text(raw, "logGUID") if lfn == log_lfn else "",
        )
        if spec.is_log:
            log = spec
        else:
            outputs.append(spec)
    if log_lfn and log is None:
        log = OutputFile(lfn=log_lfn, scope=text(raw, "scopeLog"), is_log=True, guid=text(raw, "logGUID"))
    return tuple(outputs), log


def parse_job(raw: Mapping[str, Any]) -> Job:
    """Build a Job from the server's job dictionary, or raise JobDefinitionError.

    The whole definition is checked here, before a work directory exists or anything
    runs: what would fail later (a command too long to execute, a NUL in a string, a
    malformed step, secret or scope) fails now, as a definition error naming the field.
    """
    if not isinstance(raw, Mapping):
        raise JobDefinitionError(ErrorCode.CONVERSIONFAILURE, "<job>", "the job definition is not an object")
    panda_id = integer(raw, "PandaID", required=True)
    assert panda_id is not None
    if panda_id <= 0:
        raise JobDefinitionError(
            ErrorCode.CONVERSIONFAILURE, "PandaID", f"not a positive integer: {panda_id}"
        )
    transformation = text(raw, "transformation").strip()
    if not transformation:
        raise JobDefinitionError(ErrorCode.NOTDEFINED, "transformation", "missing")
    job_pars = text(raw, "jobPars")
    check_command_size(transformation, job_pars)  # before anything reads the whole text
    parameters = split_parameters(job_pars)
    container_name = text(raw, "container_name").strip()
    if container_name.upper() in ("NULL", "NONE"):
        container_name = ""
    image = parameters.image or (check_image(container_name, "container_name") if container_name else None)
    core_count = integer(raw, "coreCount") or 1
    outputs, log = _parse_outputs(raw)
    user_proxy = raw.get("userProxy")
    if user_proxy is not None and not isinstance(user_proxy, str):
        raise JobDefinitionError(ErrorCode.CONVERSIONFAILURE, "userProxy", "expected PEM text")
    flags = frozenset(
        key for key, value in raw.items() if value is True or (isinstance(value, str) and value == "True")
    )
    return Job(
        panda_id=panda_id,
        transformation=transformation,
        job_pars=job_pars,
        payload_args=parameters.payload_args,
        container_image=image,
        attempt_nr=integer(raw, "attemptNr"),
        task_id=integer(raw, "taskID"),
        jobset_id=integer(raw, "jobsetID"),
        job_name=text(raw, "jobName"),
        job_definition_id=integer(raw, "jobDefinitionID"),
        label=text(raw, "prodSourceLabel"),
        swrelease=text(raw, "swRelease"),
        homepackage=text(raw, "homepackage"),
        cmtconfig=text(raw, "cmtConfig"),
        processing_type=text(raw, "processingType"),
        transfer_type=text(raw, "transferType"),
        resource_type=text(raw, "resource_type"),
        core_count=max(1, core_count),
        max_walltime=integer(raw, "maxWalltime"),
        min_ram=integer(raw, "minRamCount"),
        max_disk=integer(raw, "maxDiskCount"),
        max_cpu=integer(raw, "maxCpuCount"),
        inputs=_parse_inputs(raw),
        outputs=outputs,
        log=log,
        flags=flags,
        steps=parse_steps(raw),
        secrets=parse_secrets(raw),
        raw=dict(raw),
    )


def panda_id_of(raw: object) -> int | None:
    """The PandaID of a (possibly malformed) job definition, if one can be read.

    Used to report a job whose definition failed validation: without a PandaID the
    server cannot be told, and the pilot only logs it.
    """
    if not isinstance(raw, Mapping):
        return None
    try:
        return integer(raw, "PandaID", required=True)
    except JobDefinitionError:
        return None


def attempt_nr_of(raw: object) -> int | None:
    if not isinstance(raw, Mapping):
        return None
    try:
        return integer(raw, "attemptNr")
    except JobDefinitionError:
        return None
