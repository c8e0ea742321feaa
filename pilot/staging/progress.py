"""Progress of one transfer attempt, logged at a fixed interval.

Copytools that know how many bytes they moved report it (``CopyRequest.progress``);
for the others, the size of the growing local file tells the progress of a
stage-in.  ``report`` logs bytes, rate and ETA with fielded events
(``transfer.progress``), so that an operator watching a long transfer sees it move.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.logger import Logger

from pilot.logs import pilot_observer
from pilot.staging.plan import FileTransfer
from pilot.staging.transfer import Attempt, Direction


def _size_text(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


class Progress:
    """Bytes moved so far by one attempt, reported at a fixed interval."""

    log = Logger(observer=pilot_observer)

    def __init__(self, transfer: FileTransfer, attempt: Attempt, started: float, clock: Any) -> None:
        self._transfer = transfer
        self._attempt = attempt
        self._started = started
        self._clock = clock
        self.reported: int | None = None

    def update(self, count: int) -> None:
        self.reported = count

    def current(self) -> int | None:
        if self.reported is not None:
            return self.reported
        if self._transfer.direction is Direction.IN:
            try:
                return os.stat(self._transfer.local).st_size
            except OSError:
                return 0
        return None

    def report(self) -> None:
        elapsed = max(1e-6, self._clock.seconds() - self._started)
        done = self.current()
        total = self._transfer.size
        if done is None:
            self.log.info(
                "{lfn}: {tool} running for {elapsed:.0f} s",
                lfn=self._transfer.lfn,
                tool=self._attempt.tool,
                elapsed=elapsed,
                event="transfer.progress",
            )
            return
        rate = done / elapsed
        eta = (total - done) / rate if total and rate > 0 else None
        self.log.info(
            "{lfn}: {done_text}{of} at {rate_text}/s{eta_text}",
            lfn=self._transfer.lfn,
            done_text=_size_text(done),
            of=f" of {_size_text(total)} ({100 * done / total:.0f} %)" if total else "",
            rate_text=_size_text(rate),
            eta_text=f", ETA {eta:.0f} s" if eta is not None else "",
            bytes=done,
            total=total,
            rate=rate,
            eta=eta,
            tool=self._attempt.tool,
            event="transfer.progress",
        )
