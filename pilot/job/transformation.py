"""Getting a job's transformation ready to run.

Production jobs name a transformation installed on the node (``/bin/echo``,
``Reco_tf.py``).  Analysis jobs name a script by URL (``https://.../runGen-00-00-02``),
which the pilot downloads into the work directory and makes executable.  A relative
name (``runGen-00-00-02``) is fetched from the ``--baseurls`` mirrors when they are
configured; when a URL download fails, the same file name is tried on each mirror.
"""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from twisted.logger import Logger

from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError, local_file_error
from pilot.logs import pilot_observer
from pilot.model.job import Job
from pilot.server.client import ServerError
from pilot.server.errors import LocalFileError
from pilot.util.threads import ThreadRunner
from pilot.util.untrusted import transformation_source_allowed

log = Logger(observer=pilot_observer)

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")

#: Fetches ``url`` into a file (``DownloadCache.fetch``): returns the file's path.
FetchFile = Callable[[str, Path], Awaitable[Path]]


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def download_sources(job: Job, baseurls: Sequence[str], *, allow_http: bool = False) -> list[str]:
    """The URLs to try for the job's transformation, in order; empty: run it as it is.

    Only sources the pilot may run are kept (https, or http where the site allows it:
    ``pilot.util.untrusted``); PilotError(TRFDOWNLOADFAILURE) when none is left.
    """
    trf = job.transformation
    if _is_url(trf):
        name = os.path.basename(urlsplit(trf).path)
        mirrors = [f"{base}/{name}" for base in baseurls if name and not trf.startswith(base + "/")]
        candidates = [trf, *mirrors]
    elif baseurls and _SAFE_NAME.fullmatch(trf):
        candidates = [f"{base}/{trf}" for base in baseurls]
    else:
        return []
    refused = {url: transformation_source_allowed(url, None, allow_http) for url in candidates}
    allowed = [url for url, reason in refused.items() if reason is None]
    if not allowed:
        reasons = "; ".join(f"{url}: {reason}" for url, reason in refused.items())
        raise PilotError(ErrorCode.TRFDOWNLOADFAILURE, f"no source the pilot may run ({reasons})")
    return allowed


def local_name(url: str) -> str:
    """A safe file name for a downloaded transformation (never a path, never an option)."""
    name = os.path.basename(urlsplit(url).path)
    return name if _SAFE_NAME.fullmatch(name) else "transformation"


def _make_executable(target: Path, mode: int) -> None:
    """Executable for the pilot user (the payload runs as that user), by default for it alone."""
    try:
        target.chmod(mode)
    except OSError as exc:
        raise PilotError(ErrorCode.CHMODTRF, f"{target}: {exc.strerror}") from None


async def fetch_transformation(
    urls: Sequence[str], workdir: Path, fetch: FetchFile, in_thread: ThreadRunner, *, mode: int = 0o700
) -> Path:
    """Fetch the first URL that works into ``workdir`` and make it executable.

    ``fetch`` streams to disk (and, in a multi-job pilot, serves a transformation it
    already has from its cache).  Raises PilotError: TRFDOWNLOADFAILURE if no mirror
    works, CHMODTRF if the file cannot be made executable, NOLOCALSPACE (or
    FILEHANDLINGFAILURE) when it cannot be written here, which no mirror would change.
    A cancellation (the job was aborted) ends the search at once: it is not a failed mirror.
    """
    errors: list[str] = []
    for url in urls:
        target = workdir / local_name(url)
        try:
            await fetch(url, target)
        except ServerError as exc:
            errors.append(f"{url}: {exc}")
            log.warn("cannot download transformation {url}: {error}", url=url, error=str(exc))
            continue
        except LocalFileError as exc:
            raise local_file_error(OSError(exc.errno, str(exc)), f"transformation {url}") from None
        await in_thread(_make_executable, target, mode)
        log.info("downloaded transformation {url}", url=url, event="job.transformation")
        return target
    raise PilotError(ErrorCode.TRFDOWNLOADFAILURE, "; ".join(errors) or "no source to download from")
