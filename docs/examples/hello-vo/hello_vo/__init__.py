"""hello-vo: the smallest useful experiment plug-in for txpilot.

A virtual organisation (VO) customises the pilot by providing ``IExperiment``;
this package shows the three things most VOs need first, each by overriding one
method of ``BaseExperiment`` and keeping the generic behaviour for everything else:

* a payload command that announces itself before running the job's transformation,
* one extra environment variable for the payload,
* a utility process running beside the payload.

The pilot finds the plug-in through the drop-in ``twisted/plugins/hello_vo_plugin.py``
shipped with this package; ``twistd pilot --pilot-user hello-vo`` selects it.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

from twisted.plugin import IPlugin
from zope.interface import implementer

from pilot.experiments.base import BaseExperiment
from pilot.interfaces import IExperiment
from pilot.model.job import Job
from pilot.model.processes import UtilitySpec
from pilot.queuedata import QueueData

__all__ = ["UTILITY_OUTPUT", "HelloVOExperiment"]

#: The file, in the job's work directory, the heartbeat utility appends to.
UTILITY_OUTPUT = "hello-vo-utility.txt"


@implementer(IPlugin, IExperiment)
class HelloVOExperiment(BaseExperiment):
    """The generic experiment plus a greeting, ``HELLO_VO=1`` and a heartbeat utility.

    ``IPlugin`` is what ``twisted.plugin.getPlugins`` looks for; ``IExperiment`` is
    what the pilot asks of it.  Both must be declared: ``BaseExperiment`` only
    declares ``IExperiment``, so that an unfinished subclass is never registered.
    """

    name = "hello-vo"

    def payload_command(self, job: Job, transformation: str, workdir: Path) -> str:
        """Print ``hello-vo: PandaID=<id>``, then run the generic command in its own shell.

        The generic command (``<transformation> <jobPars>``) has shell semantics by
        PanDA's contract, so it is handed to an inner ``bash -c`` as one quoted
        argument: whatever quotes, semicolons or comments the job's text holds, it
        cannot change the structure of this wrapper (the greeting always comes
        first, and nothing of the job runs in the outer shell).  ``exec`` keeps a
        single process, so signals and the exit code are the payload's own.
        """
        greeting = f"hello-vo: PandaID={job.panda_id}"
        generic = super().payload_command(job, transformation, workdir)
        return f"printf '%s\\n' {shlex.quote(greeting)} && exec /bin/bash -c {shlex.quote(generic)}"

    def payload_environment(self, job: Job, workdir: Path, base: Mapping[str, str]) -> dict[str, str]:
        """The generic environment plus ``HELLO_VO=1``, so payloads can tell where they run.

        Values that come from the pilot (paths, tokens) belong here rather than in
        the command line, where they would be visible to every user in ``ps``.
        """
        env = super().payload_environment(job, workdir, base)
        env["HELLO_VO"] = "1"
        return env

    def utilities(self, job: Job, queuedata: QueueData, workdir: Path) -> Sequence[UtilitySpec]:
        """A heartbeat appending the time to ``hello-vo-utility.txt`` every second, beside the payload.

        It stands for a VO's real monitor (a memory sampler, a proxy refresher):
        started once the payload runs (``when="with"``), restarted at most twice if it
        dies, and stopped by the pilot when the payload has ended.  The argv is
        fixed text: nothing from the job reaches this shell.
        """
        return [
            UtilitySpec(
                name="heartbeat-file",
                argv=["/bin/sh", "-c", f"while :; do date +%s >> {UTILITY_OUTPUT}; sleep 1; done"],
                when="with",
                max_restarts=2,
            )
        ]
