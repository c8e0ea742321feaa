"""A base for experiment plug-ins: every ``IExperiment`` method with the generic answer.

Plug-in authors subclass ``BaseExperiment``, set ``name`` and override what their
experiment does differently; the rest keeps the behaviour the pilot documents.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

from zope.interface import implementer

from pilot.container.select import job_image, runtime_for
from pilot.interfaces import IExperiment
from pilot.model.job import Job
from pilot.model.processes import UtilitySpec
from pilot.monitor.payload_analysis import PayloadAnalysis
from pilot.queuedata import QueueData


@implementer(IExperiment)
class BaseExperiment:
    """``<transformation> <jobPars>`` through bash in the work directory, no utilities."""

    name = "base"

    def payload_command(self, job: Job, transformation: str, workdir: Path) -> str:
        """``<transformation> <jobPars>``, without ``--containerImage`` (``Job.payload_args``).

        The option names the pilot's container image; the transformation does not
        know it (bash: "invalid option").
        """
        if transformation.startswith("/") or transformation.startswith("./"):
            program = shlex.quote(transformation)
        else:
            program = transformation
        return f"{program} {job.payload_args}".strip()

    def payload_environment(self, job: Job, workdir: Path, base: Mapping[str, str]) -> dict[str, str]:
        return dict(base)

    def input_environment(self, job: Job, catalog: Path, turls: Mapping[str, str]) -> dict[str, str]:
        """``PILOT_FILE_CATALOG`` (the catalogue) and ``PILOT_INPUT_TURLS`` (JSON: LFN → URL)."""
        env = {"PILOT_FILE_CATALOG": str(catalog)}
        if turls:
            env["PILOT_INPUT_TURLS"] = json.dumps(turls, sort_keys=True)
        return env

    def adjust_queuedata(self, queuedata: QueueData) -> QueueData:
        return queuedata

    def verify_setup(self, job: Job, workdir: Path) -> str | None:
        return None

    def utilities(self, job: Job, queuedata: QueueData, workdir: Path) -> Sequence[UtilitySpec]:
        return ()

    def analyse_payload(self, job: Job, workdir: Path, analysis: PayloadAnalysis) -> PayloadAnalysis:
        return analysis

    def log_tarball_name(self, job: Job) -> str:
        return job.log.lfn if job.log is not None else f"{job.panda_id}.log.tgz"

    def file_catalog_name(self, job: Job) -> str:
        return "PoolFileCatalog.xml"

    def container_runtime(self, role: str, job: Job, queuedata: QueueData) -> str | None:
        return runtime_for(role, job, queuedata)

    def container_image(self, job: Job, queuedata: QueueData) -> str | None:
        return job_image(job)
