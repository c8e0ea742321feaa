"""The rules that turn a job, its queue and the batch system into limits.

Pure functions and small state machines, no I/O of their own (callers read the files
and the clock), so every rule is tested on its own with plain values.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import field
from pathlib import Path

from pilot.model.job import Job
from pilot.queuedata import QueueData
from pilot.util.records import record

#: Memory per core assumed when neither the job nor the queue says (MB).
DEFAULT_RAM_PER_CORE_MB = 2000


def rss_grace(queuedata: QueueData) -> float:
    """``1 + params.pilot_rss_grace / 100``; 2.0 when the queue does not set it."""
    value = queuedata.params.get("pilot_rss_grace")
    try:
        return 1.0 + float(value) / 100.0 if value is not None else 2.0
    except (TypeError, ValueError):
        return 2.0


def memory_limit_kb(job: Job, queuedata: QueueData) -> int | None:
    """The PSS limit of the job in kB (None: no limit can be derived).

    The job's own memory request (``minRamCount``, MB, what the brokerage matched it
    with) first; else the queue's ``maxrss`` scaled to the job's cores (per core times
    the job's cores for single-core queues, the whole of it for multi-core ones);
    else 2000 MB per core.  Times the queue's RSS grace factor.
    """
    cores = max(1, job.core_count)
    if job.min_ram and job.min_ram > 0:
        megabytes = float(job.min_ram)
    elif queuedata.maxrss > 0:
        queue_cores = max(1, queuedata.corecount)
        megabytes = queuedata.maxrss if queue_cores > 1 else queuedata.maxrss / queue_cores * cores
    else:
        megabytes = DEFAULT_RAM_PER_CORE_MB * cores
    return int(rss_grace(queuedata) * megabytes * 1024)


def workdir_limit_bytes(job: Job, queuedata: QueueData) -> int | None:
    """``maxwdir`` (MB) of the queue, per core for single-core jobs on multi-core queues, x1.2."""
    if queuedata.maxwdir <= 0:
        return None
    megabytes = float(queuedata.maxwdir)
    if job.core_count <= 1 and queuedata.corecount > 1:
        megabytes /= queuedata.corecount
    grace = 1.0 + float(queuedata.params.get("pilot_maxwdir_grace", 20)) / 100.0
    return int(megabytes * grace * 1024 * 1024)


@record
class LoopingDetector:
    """Decides, pass by pass, whether the payload stopped touching files.

    ``observe(now, newest_mtime)`` is called every ``interval`` seconds of the pilot's
    clock.  The payload's idle time is ``now - newest_mtime`` minus the time the pilot
    itself was suspended since then: a pass that comes much later than ``interval``
    (the node or the batch job was suspended, the VM paused) counts as suspension for
    the excess, so a job is not killed for a pause it could not have used.
    """

    limit: float
    interval: float
    #: A pass later than ``interval * slack`` is taken to include a suspension.
    slack: float = 1.5
    _last_pass: float | None = None
    _suspensions: list[tuple[float, float]] = field(default_factory=list)  # (when, how long)

    def observe(self, now: float, newest_mtime: float, started: float) -> float:
        """Record a pass; return the payload's idle time (seconds, suspensions removed).

        The first pass measures its gap from the payload's start, so a suspension (or a
        wall-clock step) before the first pass is allowed for like any later one.
        """
        previous = self._last_pass if self._last_pass is not None else started
        gap = now - previous
        if gap > self.interval * self.slack:
            self._suspensions.append((now, gap - self.interval))
        self._last_pass = now
        reference = max(newest_mtime, started)
        suspended = sum(length for when, length in self._suspensions if when > reference)
        return max(0.0, now - reference - suspended)

    def is_looping(self, idle: float) -> bool:
        return idle >= self.limit


def job_walltime(job: Job, queuedata: QueueData) -> float | None:
    """The job's own limit: ``maxWalltime`` of the job, else the queue's ``maxtime``."""
    if job.max_walltime and job.max_walltime > 0:
        return float(job.max_walltime)
    if queuedata.maxtime > 0:
        return float(queuedata.maxtime)
    return None


_AD_LINE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*=\s*(.+?)\s*$")


def parse_classad(text: str) -> dict[str, str]:
    """``Name = value`` lines of an HTCondor ``.job.ad``/``.machine.ad`` (values unparsed)."""
    ad: dict[str, str] = {}
    for line in text.splitlines():
        match = _AD_LINE.match(line)
        if match:
            ad[match.group(1).lower()] = match.group(2).strip().strip('"')
    return ad


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number > 0 else None


def batch_end_time(environ: Mapping[str, str], *, read: Callable[[str], str] | None = None) -> float | None:
    """When the batch system will end this slot (Unix time), if it can be read.

    * Slurm: ``SLURM_JOB_END_TIME``.
    * HTCondor: the machine ad (``_CONDOR_MACHINE_AD``) ``GLIDEIN_ToDie`` (glideinWMS
      pilots' end) or the job ad (``_CONDOR_JOB_AD``) start time plus ``MaxRuntime``
      / ``MaxWallTimeMins``.
    ``read`` (a callable path → text) lets tests pass files without the file system.
    """
    reader = read if read is not None else (lambda path: Path(path).read_text(errors="replace"))
    candidates: list[float] = []
    slurm = _number(environ.get("SLURM_JOB_END_TIME"))
    if slurm is not None:
        candidates.append(slurm)

    def ad_of(variable: str) -> dict[str, str] | None:
        """The classad named by ``variable`` ({} if unreadable), None if there is none."""
        path = environ.get(variable)
        if not path:
            return None
        try:
            return parse_classad(reader(path))
        except OSError:
            return {}

    machine_ad = ad_of("_CONDOR_MACHINE_AD")
    if machine_ad is not None:
        to_die = _number(machine_ad.get("glidein_todie"))
        if to_die is not None:
            candidates.append(to_die)
    ad = ad_of("_CONDOR_JOB_AD")
    if ad is not None:
        start = _number(ad.get("jobcurrentstartdate") or ad.get("jobstartdate"))
        runtime = _number(ad.get("maxruntime"))
        if runtime is None:
            minutes = _number(ad.get("maxwalltimemins"))
            runtime = minutes * 60 if minutes is not None else None
        if start is not None and runtime is not None:
            candidates.append(start + runtime)
    return min(candidates) if candidates else None
