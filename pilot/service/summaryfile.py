"""The pilot's ``--summary-file``: every job's summary and how the pilot ended, as JSON.

Rewritten (atomically) after each job and at the end, so a batch system's epilogue
or a site tool can read it at any time.
"""

from __future__ import annotations

import json
import resource
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pilot import __version__
from pilot.config import PilotConfig
from pilot.errors import ExitCode
from pilot.job.summary import JobSummary
from pilot.util.files import write_text_atomically


def own_resources() -> dict[str, float]:
    """The pilot process's own CPU time and peak memory (payloads not included)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "cpu_user_s": round(own.ru_utime, 3),
        "cpu_system_s": round(own.ru_stime, 3),
        "max_rss_kb": own.ru_maxrss,
        "children_cpu_s": round(children.ru_utime + children.ru_stime, 3),
    }


def summary_document(
    config: PilotConfig,
    started_at: float,
    exit_code: ExitCode | None,
    server_calls: int,
    summaries: Sequence[JobSummary],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    pilot: dict[str, Any] = {
        "version": __version__,
        "queue": config.queue,
        "node": config.node,
        "started_at": started_at,
        "exit_code": int(exit_code) if exit_code is not None else None,
        "exit_name": exit_code.name if exit_code is not None else None,
        "server_calls": server_calls,
        "resources": own_resources(),
        **(extra or {}),
    }
    return {"pilot": pilot, "jobs": [s.to_json() for s in summaries]}


def write_summary_file(path: Path, document: dict[str, Any], mode: int = 0o600) -> None:
    """Write the summary (in a worker thread: it may be on a slow file system)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(document, indent=1), durable=False, mode=mode)
