"""Intervals and limits of the job monitor (defaults are pilot3's, see the README)."""

from __future__ import annotations

from pilot.util.records import record

GB = 1000**3


@record(frozen=True)
class MonitorSettings:
    """All numbers the monitor uses; operators override them with options."""

    #: Seconds between resource samples (memory monitor, memory limit).
    memory_interval: float = 60.0
    #: Seconds between work-directory walks (looping, work-directory size, log sizes, free space).
    disk_interval: float = 60.0
    #: Seconds between looping checks, and the looping limit itself.
    looping_interval: float = 900.0
    looping_limit: float = 7200.0
    #: Free space the running job must leave on the work directory's file system.
    min_free_running: int = 1 * GB
    #: Free space needed before a job starts.
    min_free_start: int = 2 * GB
    #: Payload stdout/stderr and ``log.*`` files may not grow beyond this.
    stdout_limit: int = 2 * 1024**3
    #: Largest output file accepted.
    max_output_size: int = 500 * GB
    #: Sample interval and checks in debug mode (the server's ``debug`` command).
    debug_interval: float = 10.0
    #: How much of the newest file a debug heartbeat carries.
    debug_tail_bytes: int = 16 * 1024
    #: Run an installed external prmon instead of the built-in sampler when the queue asks.
    allow_prmon: bool = True
