"""The job's log tarball: a ``tar.gz`` of its work directory, named as the job's ``logFile``.

``tar`` runs as a child process (argument vector, never a shell), follows symbolic
links (``--dereference``) except those leading out of the work directory, stays on
one file system, and is bounded in time: 90 s plus 1 s per 5 MB, at most 3 hours.
Members are stored under ``tarball_PandaJob_<PandaID>_<queue>/`` as PanDA's tools
expect.  The tarball is written next to the work directory, not inside it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from twisted.internet.interfaces import IReactorProcess, IReactorTime

from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError
from pilot.job.outputs import ThreadRunner, scan_workdir
from pilot.process.runner import OS_PROCESS_CONTROL, ManagedProcess, ProcessControl, ProcessStartError


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
    """Create ``destination`` from ``workdir``; PilotError(LOGFILECREATIONFAILURE/LOGCREATIONTIMEOUT)."""
    workdir, destination = workdir.absolute(), destination.absolute()
    scan = await in_thread(scan_workdir, workdir)
    destination.parent.mkdir(parents=True, exist_ok=True)
    excludes = destination.parent / f".{destination.name}.exclude"
    skipped = [*scan.external_links, *exclude]
    excludes.write_text("".join(f"{workdir.name}/{name}\n" for name in skipped), encoding="utf-8")
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
    )
    timeout = tarball_timeout(scan.total_bytes)
    try:
        process.start()
    except ProcessStartError as exc:
        raise PilotError(ErrorCode.LOGFILECREATIONFAILURE, str(exc)) from None
    timer = clock.callLater(timeout, process.terminate, "log tarball time-out")
    try:
        outcome = await process.wait()
    finally:
        if timer.active():
            timer.cancel()
    if outcome.terminated_by_pilot:
        destination.unlink(missing_ok=True)
        raise PilotError(ErrorCode.LOGCREATIONTIMEOUT, f"tar did not finish within {timeout:.0f} s")
    # GNU tar exits 1 when files changed while being read: the tarball is still usable.
    if outcome.exit_code not in (0, 1) or not destination.is_file():
        detail = stderr.read_text(encoding="utf-8", errors="replace")[-200:] if stderr.exists() else ""
        destination.unlink(missing_ok=True)
        raise PilotError(ErrorCode.LOGFILECREATIONFAILURE, f"tar exit {outcome.shell_status}: {detail}")
    excludes.unlink(missing_ok=True)
    stderr.unlink(missing_ok=True)
    return destination
