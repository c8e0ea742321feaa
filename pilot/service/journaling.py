"""The pilot's journal over its life: opened before the first job, removed when nothing is left.

The journal lives in the base work directory (``-a/--workdir``), beside the pilot's own
directory, so that a pilot started later on the same work area finds it when this one
dies (``pilot.service.resume``).  A pilot that ends with every final update delivered
removes its journal; one that could not deliver a final update (the server was away
past the deadline) keeps it, and its successor sends the update.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from pilot.job.summary import JobSummary
from pilot.logs import pilot_observer
from pilot.util.journal import VERSION, ClaimedJournal, Journal, claim_orphans, journal_dir, journal_name
from pilot.util.threads import ThreadRunner

log = Logger(observer=pilot_observer)


async def open_journal(
    base: Path, in_thread: ThreadRunner, node: str, started: float, wall: Callable[[], float], **facts: object
) -> Journal | None:
    """This pilot's journal, opened and locked, with its first entry on disk; None if impossible.

    A pilot without a journal works as before, it only cannot be succeeded: that is
    logged, not fatal.
    """
    path = journal_dir(base.absolute()) / journal_name(node, os.getpid(), started)
    journal = Journal(path, in_thread, wall=wall)
    try:
        await in_thread(journal.open)
        await journal.append("pilot.started", v=VERSION, pid=os.getpid(), node=node, **facts)
    except CancelledError:
        raise
    except OSError as exc:
        log.error(
            "no journal ({path}: {error}): a successor could not finish this pilot's jobs",
            path=str(path),
            error=exc.strerror or str(exc),
            event="journal.unavailable",
        )
        return None
    log.info("journal: {path}", path=str(path), event="journal.opened")
    return journal


def all_delivered(summaries: Sequence[JobSummary]) -> bool:
    """Whether every job the pilot ran got its final update acknowledged (or needed none)."""
    return all(s.final_update == "delivered" or s.panda_id is None for s in summaries)


async def close_journal(journal: Journal, summaries: Sequence[JobSummary], in_thread: ThreadRunner) -> None:
    """Flush and close the journal; remove it unless a successor has something to deliver."""
    remove = all_delivered(summaries)
    try:
        await journal.append("pilot.ended", jobs=len(summaries), complete=remove)
        await journal.drained()
        await in_thread(journal.close, remove=remove)
    except OSError as exc:
        log.error(
            "journal: not closed cleanly: {error}", error=exc.strerror or str(exc), event="journal.failed"
        )
        return
    if not remove:
        log.warn(
            "journal kept for a successor: a final update was not delivered ({path})",
            path=str(journal.path),
            event="journal.kept",
        )


def remove_dead_pilot_dir(claimed: ClaimedJournal, base: Path) -> None:
    """The dead pilot's own directory, once its jobs are settled (blocking).

    Only a ``txpilot_*`` directory directly in the work area ``base`` is removed: the
    path comes from a file, and a file is never trusted to name what to delete.
    """
    started = next((e for e in claimed.entries() if e.get("kind") == "pilot.started"), None)
    named = started.get("pilot_dir") if started is not None else None
    if not isinstance(named, str):
        return
    path = Path(named)
    if path.parent != base or not path.name.startswith("txpilot_") or path.is_symlink():
        return
    log.info("removing the directory of a pilot that is gone: {path}", path=named, event="resume.cleanup")
    shutil.rmtree(path, ignore_errors=True)


def claim_dead_journals(base: Path, own: Path | None) -> list[ClaimedJournal]:
    """The journals of pilots that died on this work area, locked for this pilot (blocking)."""
    claimed = list(claim_orphans(base, own))
    for journal in claimed:
        log.warn("journal of a pilot that is gone: {path}", path=str(journal.path), event="resume.journal")
    return claimed
