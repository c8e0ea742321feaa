"""One walk of a job's work directory: its size, its newest file, its biggest logs.

The looping check (newest modification), the work-directory size limit and the
stdout/``log.*`` size limit all need the same walk, so it is done once per pass, with
``os.scandir`` (the directory entries carry the file type, so only files are stat'ed),
in a worker thread.  Symbolic links are not followed (an input linked from elsewhere is
not the job's disk use, and a link loop cannot trap the walk); the walk stays on the
work directory's file system.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable
from dataclasses import field
from pathlib import Path

from pilot.util.records import record

#: Files the payload does not write as a sign of progress (pilot3's looping ignore list,
#: generalised): the pilot's own monitor output, catalogues, setup scripts.
LOOPING_IGNORE = (
    "*.py", "prmon*", "memory_monitor*", "pilotlog*", "PoolFileCatalog*", "setup.sh",
    "pandaJob*", "job_summary.json", "DBRelease-*", "*.lib.tgz", "workDir", "pilot_status.json",
    ".memory_monitor*", ".txpilot-*",
)  # fmt: skip

#: Files whose size is limited (stdout and transform logs).
WATCHED_LOGS = ("payload.stdout", "payload.stderr", "log.*")


@record
class WorkdirScan:
    """What one walk found."""

    total_bytes: int = 0
    files: int = 0
    newest_mtime: float = 0.0  # of files that count as progress (0 when none)
    newest_path: str = ""
    largest_logs: list[tuple[str, int]] = field(default_factory=list)  # (relative path, bytes)


def _matcher(patterns: Iterable[str]) -> re.Pattern[str]:
    return re.compile("|".join(fnmatch.translate(p) for p in patterns) or "(?!)")


class WorkdirScanner:
    """Walks ``workdir``; ``ignore`` patterns match file names, not paths."""

    def __init__(
        self,
        workdir: Path,
        *,
        ignore: Iterable[str] = LOOPING_IGNORE,
        watched: Iterable[str] = WATCHED_LOGS,
        skip: Iterable[Path] = (),
    ) -> None:
        self.workdir = workdir
        self._ignore = _matcher(ignore)
        self._watched = _matcher(watched)
        self._skip = {str(p) for p in skip}

    def scan(self) -> WorkdirScan:
        """Walk now (blocking: call it through ``deferToThread``)."""
        result = WorkdirScan()
        try:
            device = os.stat(self.workdir).st_dev
        except OSError:
            return result
        stack = [str(self.workdir)]
        prefix = len(str(self.workdir)) + 1
        while stack:
            directory = stack.pop()
            try:
                entries = os.scandir(directory)
            except OSError:
                continue
            with entries:
                for entry in entries:
                    if entry.path in self._skip:
                        continue
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            if entry.stat(follow_symlinks=False).st_dev == device:
                                stack.append(entry.path)
                            continue
                        if not entry.is_file(follow_symlinks=False):
                            continue
                        info = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue  # vanished between listing and stat
                    result.files += 1
                    result.total_bytes += info.st_blocks * 512 if info.st_blocks else info.st_size
                    if not self._ignore.match(entry.name) and info.st_mtime > result.newest_mtime:
                        result.newest_mtime = info.st_mtime
                        result.newest_path = entry.path[prefix:]
                    if self._watched.match(entry.name):
                        result.largest_logs.append((entry.path[prefix:], info.st_size))
        result.largest_logs.sort(key=lambda item: -item[1])
        return result
