"""The ``generic`` experiment: run the transformation with the job parameters, nothing more."""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from pathlib import Path

from twisted.plugin import IPlugin
from zope.interface import implementer

from pilot.interfaces import IExperiment
from pilot.job.model import Job


@implementer(IPlugin, IExperiment)
class GenericExperiment:
    """``<transformation> <jobPars>`` through bash, in the job's work directory."""

    name = "generic"

    def payload_command(self, job: Job, transformation: str, workdir: Path) -> str:
        if transformation.startswith("/") or transformation.startswith("./"):
            program = shlex.quote(transformation)
        else:
            program = transformation
        return f"{program} {job.job_pars}".strip()

    def payload_environment(self, job: Job, workdir: Path, base: Mapping[str, str]) -> dict[str, str]:
        return dict(base)

    def input_environment(self, job: Job, catalog: Path, turls: Mapping[str, str]) -> dict[str, str]:
        """``PILOT_FILE_CATALOG`` (the catalogue) and ``PILOT_INPUT_TURLS`` (JSON: LFN → URL)."""
        env = {"PILOT_FILE_CATALOG": str(catalog)}
        if turls:
            env["PILOT_INPUT_TURLS"] = json.dumps(turls, sort_keys=True)
        return env
