"""File locations: Rucio's deterministic paths, URL schemes, and what is safe to put in them."""

from __future__ import annotations

import hashlib
from urllib.parse import urlsplit

from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError
from pilot.model.names import valid_scope


def check_scope(scope: str, code: ErrorCode) -> str:
    """A Rucio scope usable in a path: no separators, no ``..``, no leading dot or dash.

    ``parse_job`` already refused other scopes; this guards the paths built here.
    """
    if not valid_scope(scope):
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
    """The local path of a ``file://`` URL (or a plain path), taken literally.

    The pilot's ``file://`` URLs are built by concatenating a protocol's path and a
    Rucio path, never percent-encoded, so everything after the authority is the
    path: a ``?`` or ``#`` in it is part of a file name, not a query or a fragment
    (URL parsing made ``file:///rse/data#1.root`` copy to ``/rse/data``).
    """
    if "://" not in url:
        return url
    scheme, _, rest = url.partition("://")
    if scheme.lower() != "file":
        raise ValueError(f"not a local URL: {url}")
    host, slash, path = rest.partition("/")
    if host not in ("", "localhost"):
        raise ValueError(f"not a local URL (host {host!r}): {url}")
    return slash + path
