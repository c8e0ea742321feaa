"""The machine-readable record of one job: what the pilot did, how long it took, how it ended.

It is logged as the ``job.summary`` event, kept in the pilot's ``--summary-file`` and
written as ``job_summary.json`` in the job's work directory (and so in its log tarball).
Field names are a schema for the tools that read it: keep them stable.
"""

from __future__ import annotations

import datetime
from dataclasses import asdict, field
from typing import Any

from pilot.model.processes import ProcessRecord
from pilot.util.records import record


def utc_text(seconds: float) -> str:
    """``seconds`` since the epoch as PanDA writes times: ``YYYY-MM-DD hh:mm:ss`` (UTC)."""
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


@record
class JobSummary:
    """The record of one job (see the module docstring)."""

    panda_id: int | None
    state: str
    exit_code: int | None = None
    pilot_error_code: int = 0
    pilot_error_diag: str = ""
    final_update: str = "not-sent"
    commands: list[str] = field(default_factory=list)
    durations: dict[str, float] = field(default_factory=dict)
    received_at: float = 0.0
    ended_at: float = 0.0
    workdir: str = ""
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    transfers: list[dict[str, Any]] = field(default_factory=list)
    processes: list[ProcessRecord] = field(default_factory=list)
    runtimes: dict[str, str] = field(default_factory=dict)
    #: The reactor's lateness while the job ran (``pilot.monitor.lag``): max, mean, histogram.
    reactor: dict[str, Any] = field(default_factory=dict)
    #: Event-service jobs: ranges done/failed, batches, bytes, the payload's wait for ranges.
    event_service: dict[str, Any] = field(default_factory=dict)
    #: How the job's processes were contained and ended (``pilot.process.jobscope``): the cgroup's
    #: path, memory_peak (bytes), cpu_usage_s and limits, or "fallback": "process groups";
    #: leftovers (processes still running at the job's end) and reap_s.
    cgroup: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def note_command(self, command: str) -> None:
        if command not in self.commands:
            self.commands.append(command)
