"""The widths of the job columns a pilot writes, and what the real server does with a longer value.

A pilot that sends a value longer than its column loses data on a real PanDA server,
and it does so silently: the reply still says ``StatusCode`` 0 or, worse, the whole
update is refused.  The development server must fail the same way, or a pilot that is
tested against it hides the loss from everyone (widths and reactions read in
panda-server HEAD ``9cc36033`` and tag ``0.8.1``, schema ``PanDAWMS/panda-database``
``d57eeb90``, ``schema/oracle/ATLAS_PANDA.sql``):

* the API layer slices a few parameters itself, in *characters* (``pilotErrorDiag``
  ``[:500]`` ...), and ``updateJobStatus`` slices the attributes of
  ``JobSpec._limitLength`` (``jobSubStatus`` ``[:80]`` ...): ``SERVER_CUTS``;
* the database then refuses any value wider than its column.  The production schema is
  Oracle ``VARCHAR2(n BYTE)``, so the bound is *bytes* (UTF-8, ``AL32UTF8``): 500
  characters of ``é`` are refused even after the server's own ``[:500]``.  PostgreSQL
  counts characters but refuses NUL; neither stores text that is not valid Unicode.  The
  development server applies the strictest of them (``refused``), so a pilot that
  passes here passes on every real backend.
* a refused ``UPDATE jobsActive4`` rolls the whole update back: the job keeps its old
  state, the Adder never sees the report, and the pilot gets ``StatusCode`` 30
  ("Database error").  A refused ``jobsDebug.stdOut`` (``addStdOut``, its own
  transaction, its result ignored) only loses the debug tail: the update goes on.
* at dispatch (``getJobs``) ``node``, ``computingElement`` and ``schedulerID`` go into
  the job's row unsliced: a refused value rolls the dispatch back and the pilot is told
  there is no job.
"""

from __future__ import annotations

from collections.abc import Mapping

#: ``jobsActive4`` columns that ``updateJobStatus`` may write from a pilot's update (the
#: server's ``param`` keys), with their widths in bytes (``VARCHAR2(n BYTE)``).
JOB_COLUMNS: Mapping[str, int] = {
    "pilotErrorDiag": 500,
    "exeErrorDiag": 500,
    "jobMetrics": 500,
    "pilotTiming": 100,
    "batchID": 80,
    "jobSubStatus": 80,
    "schedulerID": 128,
    "cpuConsumptionUnit": 128,
    "pilotID": 200,
    "cpu_architecture_level": 20,
    "modificationHost": 128,
    "transExitCode": 128,
    "grid": 50,
    "sourceSite": 36,
    "destinationSite": 36,
    "jobDispatcherErrorDiag": 250,
}

#: ``JobSpec._limitLength`` as far as an update reaches it: ``updateJobStatus`` slices these
#: (in characters) before its UPDATE, whichever API generation the update came through.
SERVER_CUTS: Mapping[str, int] = {
    "pilotErrorDiag": 500,
    "exeErrorDiag": 500,
    "jobSubStatus": 80,
    "grid": 50,
    "sourceSite": 36,
    "destinationSite": 36,
    "jobDispatcherErrorDiag": 250,
}

#: ``jobsDebug.stdOut`` (``VARCHAR2(2048 BYTE)``), written by ``addStdOut``.
STDOUT_COLUMN = "jobsDebug.stdOut"
STDOUT_WIDTH = 2048

#: ``PANDALOG.MESSAGE`` (``VARCHAR2(4000 BYTE)``): ``storePilotLog`` slices the pilot log to 4000
#: characters and inserts it on its own; a refusal is only logged there, the update goes on.
PILOT_LOG_COLUMN = "PANDALOG.MESSAGE"
PILOT_LOG_WIDTH = 4000

#: Columns ``getJobs`` writes when it dispatches a job: request parameter -> (column, width).
DISPATCH_COLUMNS: Mapping[str, tuple[str, int]] = {
    "node": ("modificationHost", 128),
    "computing_element": ("computingElement", 128),
    "scheduler_id": ("schedulerID", 128),
}


def truncate_string_attrs(param: Mapping[str, object]) -> dict[str, object]:
    """``JobSpec.truncateStringAttr`` on every parameter it knows (strings only, in characters)."""
    cut = dict(param)
    for key, length in SERVER_CUTS.items():
        value = cut.get(key)
        if isinstance(value, str):
            cut[key] = value[:length]
    return cut


def refused(value: object, width: int) -> str | None:
    """Why the database would refuse ``value`` in a ``width``-byte text column (None: it fits)."""
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return "not valid Unicode (a lone surrogate)"
    if size > width:
        return f"{size} bytes > {width}"
    if "\0" in text:
        return "contains NUL"
    return None


def refused_columns(param: Mapping[str, object]) -> dict[str, str]:
    """The ``jobsActive4`` columns of ``param`` that the database would refuse, with the reason."""
    reasons = {}
    for key, width in JOB_COLUMNS.items():
        reason = refused(param.get(key), width)
        if reason is not None:
            reasons[key] = reason
    return reasons
