"""The job's log tarball: a ``tar.gz`` of its work directory, named as the job's ``logFile``.

``tar`` runs as a child process (argument vector, never a shell), follows symbolic
links (``--dereference``) except those leading out of the work directory, stays on
one file system, and is bounded in time: 90 s plus 1 s per 5 MB, at most 3 hours.
Members are stored under ``tarball_PandaJob_<PandaID>_<queue>/`` as PanDA's tools
expect.  The tarball is written next to the work directory, not inside it.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorProcess, IReactorTime

from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError, local_file_error
from pilot.model.processes import ProcessOutcome
from pilot.process.runner import OS_PROCESS_CONTROL, ManagedProcess, ProcessControl, ProcessStartError
from pilot.util.records import record
from pilot.util.threads import ThreadRunner


@record(frozen=True)
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


def tarball_timeout(total_bytes: int) -> float:
    return min(3 * 3600.0, 90.0 + total_bytes / 5e6)


def _member_root(panda_id: int, queue: str) -> str:
    return f"tarball_PandaJob_{panda_id}_{re.sub(r'[^A-Za-z0-9_.-]', '_', queue)}"


async def create_log_tarball(
    *,
    spawner: IReactorProcess,
    clock: IReactorTime,
    in_thread: ThreadRunner,
    workdir: Path,
    destination: Path,
    panda_id: int,
    queue: str,
    control: ProcessControl = OS_PROCESS_CONTROL,
    exclude: Sequence[str] = (),
) -> Path:
    """Create ``destination`` from ``workdir``.

    PilotError: LOGFILECREATIONFAILURE, LOGCREATIONTIMEOUT, or NOLOCALSPACE when the
    disk is full.  A cancellation stops tar and removes what it wrote.
    """
    workdir, destination = workdir.absolute(), destination.absolute()
    try:
        scan, excludes = await in_thread(_prepare, workdir, destination, exclude)
    except OSError as exc:
        raise local_file_error(
            exc, f"log tarball {destination.name}", ErrorCode.LOGFILECREATIONFAILURE
        ) from None
    root = _member_root(panda_id, queue)
    argv = [
        "tar",
        "--create",
        "--gzip",
        f"--file={destination}",
        "--dereference",
        "--one-file-system",
        "--anchored",
        "--no-wildcards",
        f"--exclude-from={excludes}",
        f"--transform=s|^{workdir.name}|{root}|",
        f"--directory={workdir.parent}",
        "--",
        workdir.name,
    ]
    stderr = destination.parent / f".{destination.name}.stderr"
    process = ManagedProcess(
        spawner,
        clock,
        argv,
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
        cwd=workdir.parent,
        stdout=stderr,
        stderr=stderr,
        kill_grace=5.0,
        name=f"log tarball of {panda_id}",
        control=control,
        in_thread=in_thread,
    )
    timeout = tarball_timeout(scan.total_bytes)
    try:
        process.start()
    except ProcessStartError as exc:
        raise PilotError(ErrorCode.LOGFILECREATIONFAILURE, str(exc)) from None
    timer = clock.callLater(timeout, process.terminate, "log tarball time-out")
    try:
        outcome = await process.wait()
    except CancelledError:
        process.terminate("the job is stopping")
        await in_thread(_discard, destination, excludes, stderr)
        raise
    finally:
        if timer.active():
            timer.cancel()
    problem = await in_thread(_conclude, outcome, destination, excludes, stderr)
    if outcome.terminated_by_pilot:
        raise PilotError(ErrorCode.LOGCREATIONTIMEOUT, f"tar did not finish within {timeout:.0f} s")
    if problem is not None:
        code = ErrorCode.NOLOCALSPACE if problem.startswith(DISK_FULL) else ErrorCode.LOGFILECREATIONFAILURE
        raise PilotError(code, f"tar exit {outcome.shell_status}: {problem}")
    return destination


def _prepare(workdir: Path, destination: Path, exclude: Sequence[str]) -> tuple[WorkdirScan, Path]:
    """Scan the work directory and write tar's exclude list (in a thread)."""
    scan = scan_workdir(workdir)
    destination.parent.mkdir(parents=True, exist_ok=True)
    excludes = destination.parent / f".{destination.name}.exclude"
    skipped = [*scan.external_links, *exclude]
    excludes.write_text("".join(f"{workdir.name}/{name}\n" for name in skipped), encoding="utf-8")
    return scan, excludes


#: Less free space than this where the tarball is written: the disk is full.
FULL_DISK_BYTES = 1 << 20
DISK_FULL = "the disk is full"


def _free_bytes(directory: Path) -> int:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return FULL_DISK_BYTES


def _discard(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _conclude(outcome: ProcessOutcome, destination: Path, excludes: Path, stderr: Path) -> str | None:
    """Tidy up after tar (in a thread); tar's complaint when the tarball is unusable, else None."""
    # GNU tar exits 1 when files changed while being read: the tarball is still usable.
    problem: str | None = None
    if outcome.terminated_by_pilot:
        problem = "terminated"
    elif outcome.exit_code not in (0, 1) or not destination.is_file():
        problem = (
            stderr.read_text(encoding="utf-8", errors="replace")[-200:] if stderr.exists() else "no tarball"
        )
    if problem is not None:
        destination.unlink(missing_ok=True)
    _discard(excludes, stderr)
    return problem
