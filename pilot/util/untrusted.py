"""Checks on names and URLs that come from outside the pilot: job definitions and plug-ins.

``safe_file_name``
    A name that is joined to a directory (the log tarball's, from
    ``IExperiment.log_tarball_name``) must stay a single entry of that directory and
    must not read as an option to the tools that get it (``tar``, copytools).

``transformation_source_allowed``
    What a job may ask the pilot to download and run.  ``https`` is authenticated and
    intact; ``http`` is neither, so anyone on the path can swap the script: it is
    allowed only with a cryptographic checksum to check the download against (adler32
    and md5 protect against accidents, not against someone who changes the file), or
    when the site allows it explicitly (a mirror on its own network).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from urllib.parse import urlsplit

#: Longest file name on the usual Linux file systems, in bytes.
NAME_MAX = 255

#: Checksum kinds strong enough to stand in for an authenticated download (hex lengths).
STRONG_CHECKSUMS: dict[str, int] = {"sha256": 64, "sha384": 96, "sha512": 128}
_HEX = re.compile(r"[0-9a-fA-F]+")


def safe_file_name(name: str) -> str:
    """``name`` if it is a plain file name; ValueError (saying why) otherwise.

    Refused: empty, ``.``, anything with ``/``, NUL, ``..`` or a control character, a
    leading ``-``, text that is not valid UTF-8 (lone surrogates), more than 255 bytes.
    """
    if not isinstance(name, str):
        raise ValueError(f"a file name must be text, not {type(name).__name__}")
    if name in ("", "."):
        raise ValueError(f"not a file name: {name!r}")
    if "/" in name:
        raise ValueError(f"a file name must not contain '/': {name!r}")
    if "\0" in name:
        raise ValueError(f"a file name must not contain NUL: {name!r}")
    if ".." in name:
        raise ValueError(f"a file name must not contain '..': {name!r}")
    if name.startswith("-"):
        raise ValueError(f"a file name must not start with '-' (it would read as an option): {name!r}")
    if any(unicodedata.category(char) == "Cc" for char in name):
        raise ValueError(f"a file name must not contain control characters: {name!r}")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"a file name must be valid UTF-8: {name!r}") from None
    if size > NAME_MAX:
        raise ValueError(f"a file name must not be longer than {NAME_MAX} bytes: {size} bytes")
    return name


def strong_checksum(checksum: str | None) -> tuple[str, str] | None:
    """(hashlib name, lower-case hex digest) of a ``sha256:<hex>``-style checksum, else None."""
    if not checksum:
        return None
    kind, _, digest = checksum.strip().partition(":")
    kind = kind.lower()
    if STRONG_CHECKSUMS.get(kind) != len(digest) or not _HEX.fullmatch(digest):
        return None
    return kind, digest.lower()


def checksum_mismatch(data: bytes, checksum: str) -> str | None:
    """None if ``data`` has the strong ``checksum``, else why not (for the job's diagnostic)."""
    parsed = strong_checksum(checksum)
    if parsed is None:
        return f"not a sha256/sha384/sha512 checksum: {checksum!r}"
    kind, expected = parsed
    actual = hashlib.new(kind, data).hexdigest()
    return None if actual == expected else f"{kind} {actual} != {expected}"


def transformation_source_allowed(url: str, checksum: str | None, allow_http: bool) -> str | None:
    """None if the pilot may download and run ``url``; otherwise the reason it may not.

    ``checksum``: what the download must match (``sha256:<hex>``...; the caller checks
    it); ``allow_http``: the site option that accepts plain ``http`` sources anyway.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as exc:
        return f"not a valid URL ({exc})"
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        return f"only https (or http with a checksum) sources are run, not {scheme or 'a relative name'}"
    if not host:
        return "the URL names no host"
    if parts.username is not None or parts.password is not None:
        return "the URL carries credentials, which would end up in logs"
    if scheme == "https" or allow_http:
        return None
    if strong_checksum(checksum) is not None:
        return None
    if checksum:
        return (
            f"http source with a {checksum.partition(':')[0] or 'malformed'} checksum: only"
            " sha256/sha384/sha512 protect a download that anyone on the path can change"
        )
    return "http source without a checksum: use https, give a sha256 checksum, or allow http at the site"
