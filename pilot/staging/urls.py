"""File locations: Rucio's deterministic paths, URL schemes, and what is safe to put in them."""

from __future__ import annotations

import hashlib
import re
from urllib.parse import urlsplit

from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError

_SCOPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_scope(scope: str, code: ErrorCode) -> str:
    """A Rucio scope usable in a path: no separators, no ``..``, no leading dot or dash."""
    if not _SCOPE.fullmatch(scope) or ".." in scope:
        raise PilotError(code, f"unsafe scope {scope!r}")
    return scope


def rucio_path(scope: str, name: str) -> str:
    """Rucio's deterministic ("hash") relative path of ``scope:name``.

    ``<scope>/<md5[0:2]>/<md5[2:4]>/<name>``, where user and group scopes have
    their dots turned into directories (``user.jdoe`` → ``user/jdoe``).
    """
    digest = hashlib.md5(f"{scope}:{name}".encode(), usedforsecurity=False).hexdigest()
    if scope.startswith(("user.", "group.")):
        scope = scope.replace(".", "/")
    return f"{scope}/{digest[0:2]}/{digest[2:4]}/{name}"


def scheme_of(url: str) -> str:
    return urlsplit(url).scheme.lower() if "://" in url else "file"


def local_path(url: str) -> str:
    """The local path of a ``file://`` URL (or a plain path)."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.scheme != "file":
        raise ValueError(f"not a local URL: {url}")
    return parts.path
