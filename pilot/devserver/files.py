"""Files the server hands out (``/trf/``), and a count of the requests it has seen.

The real server serves analysis transformations from its cache area
(``/trf/user/runGen-...``) over plain HTTP and HTTPS, with the ETag and Last-Modified
that let a client revalidate its copy (``If-None-Match`` → 304).  The request count
lets a test or a benchmark see how many calls a pilot really made, by path.
"""

from __future__ import annotations

import email.utils
import hashlib
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from pilot.devserver import protocol
from pilot.devserver.protocol import Reply


class _Logged(Protocol):
    @property
    def method(self) -> str: ...

    @property
    def uri(self) -> str: ...


def file_reply(root: Path | None, relative: str, if_none_match: str | None) -> Reply:
    """``relative`` under ``root``: 200 with ETag and Last-Modified, 304 when the client has it, 404."""
    if root is None or not relative:
        return protocol.text_error(404, "Not Found")
    path = (root / relative).resolve()
    if root.resolve() not in path.parents or not path.is_file():
        return protocol.text_error(404, "Not Found")
    data = path.read_bytes()
    etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
    modified = email.utils.formatdate(path.stat().st_mtime, usegmt=True)
    headers = (("ETag", etag), ("Last-Modified", modified))
    if if_none_match is not None and etag in [tag.strip() for tag in if_none_match.split(",")]:
        return Reply(304, "application/octet-stream", b"", b"Not Modified", headers)
    return Reply(200, "application/octet-stream", data, b"OK", headers)


def request_counts(entries: Iterable[_Logged]) -> dict[str, int]:
    """``{"<METHOD> <path>": count}`` of the logged requests (query strings left out)."""
    return dict(Counter(f"{e.method} {e.uri.split('?', 1)[0]}" for e in entries))
