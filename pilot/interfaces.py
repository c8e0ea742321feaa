"""Contracts between the pilot core and experiment plug-ins.

An experiment (ATLAS, or a small VO) customises the pilot through an ``IExperiment``
plug-in, selected once at start-up with ``--pilot-user <name>`` and found with
``twisted.plugin.getPlugins`` among the drop-ins of ``twisted/plugins/``.  The
pilot core never imports experiment code by module path.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from zope.interface import Attribute, Interface

from pilot.job.model import Job


class IExperiment(Interface):
    """How an experiment turns a PanDA job into a payload process."""

    name = Attribute("The plug-in's name, as given to --pilot-user (str).")

    def payload_command(job: Job, transformation: str, workdir: Path) -> str:
        """The shell command (run with ``/bin/bash -c`` in ``workdir``) of ``job``'s payload.

        ``transformation`` is the job's transformation, already replaced by the
        path of the downloaded file when it was a URL.  ``job.job_pars`` has shell
        semantics (PanDA's contract).  Nothing pilot-side (credentials, pilot paths)
        may be spliced into the command: pass such things in the environment.
        """

    def payload_environment(job: Job, workdir: Path, base: Mapping[str, str]) -> dict[str, str]:
        """The payload's environment, given the pilot's explicit ``base`` environment."""
