"""Reading the server's job dictionary, one field at a time, and refusing what cannot run.

The job dictionary is a flat bag of strings (``NULL`` for unset columns, comma-joined
per-file lists).  Everything the pilot reads from it goes through the readers here, so
that one rule holds for every field: a value the pilot may pass to a process, put in
an environment variable or join to a path holds no NUL (the kernel cuts C strings
there, and ``spawnProcess`` refuses it) and is valid UTF-8 (a lone surrogate such as
``"\\udc80"``, which JSON can carry, cannot be encoded for ``execve``).  Such a value is
a broken definition, so it is a ``JobDefinitionError`` found before anything runs, not
a payload failure found when the process does not start.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError

UNSET = ("", "NULL", "None")

#: How much of an offending value a message may quote (diagnostics are cut at 256).
_SHOWN = 40


class JobDefinitionError(PilotError):
    """A job definition that cannot be run; ``field`` names the culprit."""

    def __init__(self, code: ErrorCode, field_name: str, message: str) -> None:
        super().__init__(code, f"job definition field {field_name!r}: {message}")
        self.field = field_name


def shown(value: str) -> str:
    """``value`` quoted for a diagnostic, shortened: messages name, they do not copy."""
    return repr(value) if len(value) <= _SHOWN else repr(value[:_SHOWN]) + "..."


def check_text(value: str, field_name: str) -> str:
    """``value`` if a process can receive it: no NUL, no lone surrogate (not UTF-8)."""
    nul = value.find("\x00")
    if nul >= 0:
        raise JobDefinitionError(
            ErrorCode.CONVERSIONFAILURE, field_name, f"contains a NUL character (at offset {nul})"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise JobDefinitionError(
            ErrorCode.CONVERSIONFAILURE,
            field_name,
            f"not valid UTF-8: lone surrogate {value[exc.start]!r} at offset {exc.start}",
        ) from None
    return value


def utf8_size(value: str) -> int:
    """The size of ``value`` on a command line (checked text only: it must encode)."""
    return len(value.encode("utf-8"))


def text(raw: Mapping[str, Any], key: str, *, checked: bool = True) -> str:
    """A string field; ``NULL``/absent is ``""``, numbers and booleans become their text.

    ``checked=False`` leaves the value to a stricter check of its own (LFNs).
    """
    value = raw.get(key)
    if value is None:
        return ""
    if isinstance(value, str):
        if value in ("NULL", "None"):
            return ""
        return check_text(value, key) if checked else value
    if isinstance(value, bool | int | float):
        return str(value)
    raise JobDefinitionError(
        ErrorCode.CONVERSIONFAILURE, key, f"expected a string, got {type(value).__name__}"
    )


def integer(raw: Mapping[str, Any], key: str, *, required: bool = False) -> int | None:
    value = raw.get(key)
    if value is None or (isinstance(value, str) and value.strip() in UNSET):
        if required:
            raise JobDefinitionError(ErrorCode.NOTDEFINED, key, "missing")
        return None
    if isinstance(value, bool):
        raise JobDefinitionError(ErrorCode.CONVERSIONFAILURE, key, f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    shown_value = shown(value) if isinstance(value, str) else type(value).__name__
    raise JobDefinitionError(ErrorCode.CONVERSIONFAILURE, key, f"expected an integer, got {shown_value}")


def listing(raw: Mapping[str, Any], key: str, *, checked: bool = True) -> list[str]:
    """A comma-joined per-file list; unset entries become empty strings.

    ``checked=False`` leaves the entries to a stricter check of their own (LFNs).
    """
    value = raw.get(key)
    if value is None:
        return []
    if isinstance(value, list):
        items = []
        for index, item in enumerate(value):
            if item is not None and not isinstance(item, str | int | float):
                raise JobDefinitionError(
                    ErrorCode.CONVERSIONFAILURE,
                    f"{key}[{index}]",
                    f"expected a string, got {type(item).__name__}",
                )
            items.append("" if item is None else str(item))
    elif isinstance(value, str):
        if value in UNSET:
            return []
        items = value.split(",")
    else:
        raise JobDefinitionError(
            ErrorCode.CONVERSIONFAILURE, key, f"expected a comma-separated list, got {type(value).__name__}"
        )
    return [
        ""
        if item.strip() in UNSET
        else check_text(item.strip(), f"{key}[{index}]")
        if checked
        else item.strip()
        for index, item in enumerate(items)
    ]


def aligned(raw: Mapping[str, Any], key: str, base_key: str, count: int) -> list[str]:
    """A per-file list that must be empty or exactly as long as ``base_key``'s."""
    items = listing(raw, key)
    if not items or not any(items):
        return [""] * count
    if len(items) != count:
        raise JobDefinitionError(
            ErrorCode.NOTSAMELENGTH, key, f"has {len(items)} entries but {base_key!r} has {count}"
        )
    return items
