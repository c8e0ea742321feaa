"""A finished job's outputs: found in the work directory, measured, ready for the report.

Each output must be a regular file inside the work directory; its size and adler32
are read back from disk (in a thread, never on the reactor) for the job output
report (``pilot.model.files``).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import TypeVar

from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError
from pilot.model.files import ReportedFile
from pilot.model.job import Job, OutputFile
from pilot.util.checksum import file_facts
from pilot.util.threads import ThreadRunner

T = TypeVar("T")


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
