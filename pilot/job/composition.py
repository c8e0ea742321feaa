"""The job's pre-, co- and post-process commands: parsed, fetched when they are URLs, run as PanDA runs them.

A job definition may carry ``preprocess``, ``coprocess`` and ``postprocess``, each
``{"command": ..., "args": ...}`` (a dict or its JSON text; ``ignore_failure`` on the
post-process; ``checksum`` ``sha256:<hex>``/``ad:<adler32>``/``md:<md5>`` for commands
that are URLs).  The semantics are PanDA's:

* the pre-process runs to completion before the payload; exit 160, 161 or 162 ends a
  hyper-parameter-optimisation loop (the payload does not run, the job is not failed);
  any other non-zero exit fails the job with PREPROCESSFAILURE;
* the co-process starts with the payload and is stopped (TERM→KILL) when it ends;
* the post-process runs after the payload; its failure is POSTPROCESSFAILURE unless
  ``ignore_failure`` is set.

How they run beside the payload, with the experiment's utilities
(``pilot.process.utility``), is ``pilot.job.phases.execute``.  Each process writes
``<name>.stdout``/``<name>.stderr`` in the work directory and has a ``ProcessRecord``
in the job summary.
"""

from __future__ import annotations

import hashlib
import os
import shlex
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError
from pilot.logs import pilot_observer
from pilot.model.documents import Step
from pilot.util.checksum import RunningChecksum
from pilot.util.threads import ThreadRunner

log = Logger(observer=pilot_observer)

#: Pre-process exit codes that end an HPO loop without an error.
HPO_LOOP_END = frozenset({160, 161, 162})


def _verify(data: bytes, checksum: str) -> str | None:
    """None if ``data`` matches ``checksum`` (``sha256:``, ``ad:``, ``md:``), else a reason."""
    kind, _, value = checksum.partition(":")
    kind = kind.lower()
    if kind == "sha256":
        actual = hashlib.sha256(data).hexdigest()
    elif kind in ("ad", "adler32", "md", "md5"):
        running = RunningChecksum(md5=kind.startswith("md"))
        running.update(data)
        facts = running.facts()
        actual = facts.adler32 if kind.startswith("ad") else str(facts.md5)
    else:
        return f"unknown checksum type {kind!r}"
    return None if actual == value.lower() else f"{kind} {actual} != {value.lower()}"


def step_failure(name: str) -> ErrorCode:
    """The code a step's failure gives the job (a co-process counts as the pre-process)."""
    return ErrorCode.POSTPROCESSFAILURE if name == "postprocess" else ErrorCode.PREPROCESSFAILURE


def _install(target: Path, data: bytes, mode: int) -> None:
    target.write_bytes(data)
    target.chmod(mode)


async def fetch_step(
    step: Step,
    workdir: Path,
    download: Callable[[str], Awaitable[bytes]],
    in_thread: ThreadRunner,
    *,
    mode: int = 0o700,
) -> tuple[Step, str]:
    """Download a URL command into the work directory; returns the local step and its sha256."""
    code = step_failure(step.name)
    try:
        data = await download(step.command)
    except CancelledError:
        raise  # the job was aborted: not the step's failure
    except Exception as exc:  # noqa: BLE001 - any other failure to fetch is the step's failure
        raise PilotError(code, f"cannot download {step.name} {step.command}: {exc}") from None
    if step.checksum is not None:
        problem = _verify(data, step.checksum)
        if problem is not None:
            raise PilotError(code, f"{step.name} {step.command}: checksum mismatch ({problem})")
    name = os.path.basename(urlsplit(step.command).path) or step.name
    if not name.replace(".", "").replace("-", "").replace("_", "").isalnum():
        name = step.name
    target = workdir / f"{step.name}-{name}"
    await in_thread(_install, target, data, mode)
    digest = hashlib.sha256(data).hexdigest()
    log.info("{step}: downloaded {url} (sha256 {digest})", step=step.name, url=step.command, digest=digest)
    return Step(step.name, f"./{target.name}", step.args, step.ignore_failure, step.checksum), digest


def step_argv(step: Step) -> list[str]:
    """The step as PanDA runs it: ``command args`` with shell semantics, in the work directory."""
    command = shlex.quote(step.command) if step.command.startswith(("/", "./")) else step.command
    return ["/bin/bash", "-c", f"{command} {step.args}".strip()]
