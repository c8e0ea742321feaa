"""An external prmon as the job's memory monitor, when the queue asks for it.

Sites that already run HSF prmon (https://github.com/HSF/prmon) everywhere can have the
pilot use it instead of the built-in sampler: queuedata ``params.memory_monitor =
"prmon"``.  The pilot runs ``prmon --pid <payload> --filename
memory_monitor_output.txt --json-summary memory_monitor_summary.json --interval N``
beside the payload, in the work directory, in its own process group, and stops it with
SIGUSR1 (prmon's "write the summary and exit") when the payload has ended.  The
summary it wrote becomes the job's memory fields.  When prmon is not installed the
built-in monitor writes the same files.  The built-in sampler keeps enforcing the
memory limit either way (it is cheap and needs no file parsing).
"""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.logger import Logger

from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError
from pilot.logs import pilot_observer
from pilot.model.processes import PAYLOAD_PID, ProcessRecord, UtilitySpec
from pilot.monitor import prmon_output
from pilot.process.runner import OS_PROCESS_CONTROL, ManagedProcess, ProcessControl, ProcessStartError
from pilot.process.utility import Utility
from pilot.queuedata import QueueData
from pilot.util.threads import ThreadRunner

log = Logger(observer=pilot_observer)


def prmon_requested(queuedata: QueueData) -> bool:
    """Whether the queue asks for an external prmon (``params.memory_monitor``)."""
    return str(queuedata.params.get("memory_monitor", "")).strip().lower() == "prmon"


def find_prmon(environ: Mapping[str, str]) -> str | None:
    """prmon on the payload's ``PATH``, if installed."""
    return shutil.which("prmon", path=environ.get("PATH", ""))


class ExternalPrmon:
    """One prmon watching one payload: restarted (up to ``MAX_RESTARTS``) if it crashes."""

    #: As pilot3: a crashed prmon is started again, at most five times.
    MAX_RESTARTS = 5

    def __init__(
        self,
        spawner: IReactorProcess,
        clock: IReactorTime,
        program: str,
        workdir: Path,
        *,
        environ: Mapping[str, str],
        interval: float,
        control: ProcessControl = OS_PROCESS_CONTROL,
        in_thread: ThreadRunner | None = None,
    ) -> None:
        self.workdir = workdir
        self._in_thread = in_thread
        self._spawner = spawner
        self._clock = clock
        self._program = program
        self._environ = dict(environ)
        self._interval = interval
        self._control = control
        self.utility: Utility | None = None

    def _process(self, argv: list[str]) -> ManagedProcess:
        process = ManagedProcess(
            self._spawner,
            self._clock,
            argv,
            env=self._environ,
            cwd=self.workdir,
            stdout=self.workdir / "prmon.stdout",
            stderr=self.workdir / "prmon.stderr",
            kill_grace=10.0,
            name="prmon",
            control=self._control,
            in_thread=self._in_thread,
        )
        try:
            process.start()
        except ProcessStartError as exc:
            raise PilotError(ErrorCode.PAYLOADEXECUTIONFAILURE, f"prmon: {exc}") from None
        return process

    def start(self, pid: int) -> bool:
        """Start watching ``pid``; False (logged) if prmon cannot be started."""
        spec = UtilitySpec(
            name="prmon",
            argv=[
                self._program,
                "--pid",
                PAYLOAD_PID,
                "--filename",
                prmon_output.TIME_SERIES_NAME,
                "--json-summary",
                prmon_output.SUMMARY_NAME,
                "--interval",
                str(max(1, int(self._interval))),
            ],  # fmt: skip
            when="with",
            max_restarts=self.MAX_RESTARTS,
            stop_signal=signal.SIGUSR1,
        )
        utility = Utility(
            spec=spec, start_process=self._process, clock=self._clock,
            record=ProcessRecord(name="prmon", role="utility", stdout="prmon.stdout", stderr="prmon.stderr"),
            payload_pid=pid,
        )  # fmt: skip
        utility.start()
        if utility.process is None:
            return False
        self.utility = utility
        return True

    @property
    def record(self) -> ProcessRecord | None:
        return self.utility.record if self.utility is not None else None

    async def stop(self, in_thread: ThreadRunner) -> dict[str, Any] | None:
        """SIGUSR1 (then SIGKILL after the grace) and read the summary prmon wrote."""
        if self.utility is None:
            return None
        await self.utility.stop()
        return await in_thread(_read_summary, self.workdir / prmon_output.SUMMARY_NAME)


def _read_summary(path: Path) -> dict[str, Any] | None:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None
