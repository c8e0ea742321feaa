"""JSON documents inside a job definition: the pre/co/post-process steps and the user's secrets.

Both arrive as JSON text (legacy replies) or as objects (JSON replies), and both are
read only when the job is already running: a step just before the payload, the
secrets when the payload's environment is built.  A malformed one found then fails
the job late, with a misleading code (an ``args`` list holding an object used to end
in UNKNOWNEXCEPTION).  They are checked here, when the job arrives, against the shape
PanDA gives them, and every failure is a CONVERSIONFAILURE naming the field.

Steps: ``{"command": str, "args": str | [str, ...], "ignore_failure": bool, "checksum":
"sha256:<hex>" | "ad:<adler32>" | "md:<md5>"}``; other keys are ignored (forward
compatibility).  Secrets: an object of string → string.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from pilot.errorcodes import ErrorCode
from pilot.model.fields import UNSET, JobDefinitionError, check_text, utf8_size
from pilot.model.jobpars import MAX_COMMAND_BYTES
from pilot.util.records import record

STEPS = ("preprocess", "coprocess", "postprocess")

_CHECKSUM = re.compile(r"(sha256:[0-9a-fA-F]{64}|(ad|adler32):[0-9a-fA-F]{1,8}|(md|md5):[0-9a-fA-F]{32})")
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no", "")


@record(frozen=True)
class Step:
    """One of the job's pre/co/post-process commands."""

    name: str
    command: str
    args: str = ""
    ignore_failure: bool = False
    checksum: str | None = None

    @property
    def is_url(self) -> bool:
        return urlsplit(self.command).scheme in ("http", "https")


def _document(value: Any, field_name: str) -> Any:
    """The JSON value of a field that holds JSON text or an already decoded object."""
    if not isinstance(value, str):
        return value
    check_text(value, field_name)
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        raise JobDefinitionError(ErrorCode.CONVERSIONFAILURE, field_name, "is not valid JSON") from None


def _step(name: str, document: Any) -> Step:
    if not isinstance(document, Mapping):
        raise JobDefinitionError(
            ErrorCode.CONVERSIONFAILURE,
            name,
            f"must be an object {{command, args}}, not {type(document).__name__}",
        )
    command = document.get("command")
    if not isinstance(command, str) or not command.strip():
        raise JobDefinitionError(ErrorCode.CONVERSIONFAILURE, f"{name}.command", "must be a non-empty string")
    check_text(command, f"{name}.command")
    args = document.get("args", "")
    if isinstance(args, list):
        for index, item in enumerate(args):
            if not isinstance(item, str):
                raise JobDefinitionError(
                    ErrorCode.CONVERSIONFAILURE,
                    f"{name}.args[{index}]",
                    f"must be a string, not {type(item).__name__}",
                )
        args = " ".join(args)
    elif args is None:
        args = ""
    elif not isinstance(args, str):
        raise JobDefinitionError(
            ErrorCode.CONVERSIONFAILURE,
            f"{name}.args",
            f"must be a string or a list, not {type(args).__name__}",
        )
    check_text(args, f"{name}.args")
    if utf8_size(command) + 1 + utf8_size(args) > MAX_COMMAND_BYTES:
        raise JobDefinitionError(
            ErrorCode.CONVERSIONFAILURE, name, f"command and args exceed {MAX_COMMAND_BYTES} bytes"
        )
    ignore = document.get("ignore_failure", False)
    if isinstance(ignore, str) and ignore.strip().lower() in _TRUE + _FALSE:
        ignore = ignore.strip().lower() in _TRUE
    elif not isinstance(ignore, bool | int) or ignore not in (0, 1):
        raise JobDefinitionError(
            ErrorCode.CONVERSIONFAILURE, f"{name}.ignore_failure", "must be true or false"
        )
    checksum = document.get("checksum")
    if checksum in (None, ""):
        checksum = None
    elif not isinstance(checksum, str) or not _CHECKSUM.fullmatch(checksum):
        raise JobDefinitionError(
            ErrorCode.UNKNOWNCHECKSUMTYPE,
            f"{name}.checksum",
            "must be sha256:<hex>, ad:<adler32> or md:<md5>",
        )
    return Step(name=name, command=command, args=args, ignore_failure=bool(ignore), checksum=checksum)


def parse_steps(raw: Mapping[str, Any]) -> dict[str, Step]:
    """The job's steps by name (absent, ``NULL``, ``{}`` and ``"{}"`` mean no step)."""
    steps: dict[str, Step] = {}
    for name in STEPS:
        value = raw.get(name)
        if value is None or (isinstance(value, str) and value.strip() in (*UNSET, "{}")):
            continue
        if isinstance(value, str) and utf8_size(value) > MAX_COMMAND_BYTES:
            raise JobDefinitionError(
                ErrorCode.CONVERSIONFAILURE, name, f"{utf8_size(value)} bytes; at most {MAX_COMMAND_BYTES}"
            )
        document = _document(value, name)
        if document == {}:
            continue
        steps[name] = _step(name, document)
    return steps


def parse_secrets(raw: Mapping[str, Any]) -> dict[str, str]:
    """The user's secrets (``secrets``): a JSON object of string → string; messages never quote them."""
    value = raw.get("secrets")
    if value is None or (isinstance(value, str) and value.strip() in UNSET):
        return {}
    document = _document(value, "secrets")
    if not isinstance(document, Mapping):
        raise JobDefinitionError(
            ErrorCode.CONVERSIONFAILURE,
            "secrets",
            f"must be an object of strings, not {type(document).__name__}",
        )
    for index, (key, item) in enumerate(document.items()):
        if not isinstance(key, str) or not isinstance(item, str):
            raise JobDefinitionError(
                ErrorCode.CONVERSIONFAILURE,
                "secrets",
                f"entry {index} is not string -> string (value: {type(item).__name__})",
            )
    return dict(document)
