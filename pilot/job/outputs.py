"""A finished job's files: its outputs, its log tarball, and the job output report.

The job output report is what PanDA's Adder reads to register a job's files: a JSON
object keyed by LFN with ``guid``, ``fsize`` and ``adler32`` (or ``md5sum``) for every
output and for the log tarball, whose GUID must be the ``logGUID`` the server handed
out.  A missing or malformed report fails the job on the server side, so it is built
from facts measured here (size and checksum read back from disk), never assumed.

File reads run in a thread (``ThreadRunner``), never on the reactor thread.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred

from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError
from pilot.job.model import Job, OutputFile
from pilot.util.checksum import FileFacts, file_facts

T = TypeVar("T")


class ThreadRunner(Protocol):
    """Runs a blocking function in a worker thread (``deferToThreadPool`` bound to a pool)."""

    def __call__(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]: ...


@dataclass(frozen=True)
class ReportedFile:
    """One entry of the job output report."""

    lfn: str
    guid: str
    facts: FileFacts
    path: Path
    is_log: bool = False
    surl: str = ""
    endpoint: str = ""

    def report_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"guid": self.guid, "fsize": self.facts.size, "adler32": self.facts.adler32}
        if self.surl:
            entry["surl"] = self.surl
        if self.endpoint:
            entry["endpoint"] = self.endpoint
        return entry


def job_output_report(files: Iterable[ReportedFile]) -> str:
    """The report as the server's ``xml`` / ``job_output_report`` parameter (JSON text)."""
    return json.dumps({f.lfn: f.report_entry() for f in files}, sort_keys=True)


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
    except ValueError:
        return False
    return True


def locate_output(spec: OutputFile, workdir: Path) -> Path:
    """The local path of an output; PilotError(MISSINGOUTPUTFILE) if absent or escaping."""
    path = workdir / spec.lfn
    if not path.exists():
        raise PilotError(ErrorCode.MISSINGOUTPUTFILE, f"{spec.lfn} was not produced")
    if not _inside(path, workdir) or not path.is_file():
        raise PilotError(
            ErrorCode.MISSINGOUTPUTFILE, f"{spec.lfn} is not a regular file in the work directory"
        )
    return path


async def describe_outputs(
    job: Job, workdir: Path, in_thread: ThreadRunner, *, max_size: int | None = None
) -> list[ReportedFile]:
    """Size and adler32 of every output of ``job``; outputs get fresh GUIDs.

    An empty output (EMPTYOUTPUTFILE) or one above ``max_size`` (OUTPUTFILETOOLARGE)
    fails the job before anything is checksummed or stored.
    """
    reported: list[ReportedFile] = []
    for spec in job.outputs:
        path = locate_output(spec, workdir)
        size = (await in_thread(os.stat, path)).st_size
        if size == 0:
            raise PilotError(ErrorCode.EMPTYOUTPUTFILE, f"output {spec.lfn} is empty")
        if max_size is not None and size > max_size:
            raise PilotError(
                ErrorCode.OUTPUTFILETOOLARGE,
                f"output {spec.lfn} is {size / 1e9:.1f} GB (limit {max_size / 1e9:.0f} GB)",
            )
        facts = await in_thread(file_facts, path)
        reported.append(ReportedFile(spec.lfn, spec.guid or str(uuid.uuid4()), facts, path))
    return reported


@dataclass(frozen=True)
class WorkdirScan:
    """What the log tarball step needs to know about a work directory."""

    total_bytes: int
    external_links: tuple[str, ...]  # paths (relative to the work dir) of links leading outside it


def scan_workdir(workdir: Path) -> WorkdirScan:
    """Walk ``workdir`` without following links: total size and links that leave it.

    The log tarball follows symbolic links (inputs are often links into a cache), so
    a link that points outside the work directory — to the pilot's proxy, say — must
    be excluded, or the tarball would carry it to storage.
    """
    root = workdir.resolve()
    total = 0
    external: list[str] = []
    for current, dirs, files in os.walk(workdir, followlinks=False):
        for name in list(dirs) + files:
            full = Path(current) / name
            try:
                info = full.lstat()
            except OSError:
                continue
            if full.is_symlink():
                target = Path(os.path.realpath(full))
                if target != root and root not in target.parents:
                    external.append(str(full.relative_to(workdir)))
                continue
            if name in files:
                total += info.st_size
    return WorkdirScan(total, tuple(sorted(external)))
