"""Where the pilot's own credentials live: paths only, contents are read on use.

The pilot's proxy and token authenticate it to the PanDA server and to storage; they
are never the payload's (a job that needs credentials brings its own ``secrets``).
"""

from __future__ import annotations

from pathlib import Path

from pilot.util.records import record


@record(frozen=True)
class Credentials:
    """Where the pilot's own credentials live (paths only: contents are read on use)."""

    cacert: Path | None = None
    capath: Path | None = None
    proxy: Path | None = None
    token_file: Path | None = None
    auth_origin: str | None = None
