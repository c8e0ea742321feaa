"""pilot3's command line, as pilot wrappers pass it, understood by txpilot.

Site wrappers (and Harvester's submission templates) start the pilot with pilot3's
exact flags.  An option unknown to a getopt parser ends the pilot with exit 2
before it asks for a single job, so txpilot accepts every pilot3 option name:

* ``ALIASES``: pilot3's spelling of a txpilot setting (``--joblabel`` is
  ``--job-label``); the same setting, the last one given wins as in pilot3.
* settings txpilot has under pilot3's own name (``-i/--versiontag``, ``--job-type``,
  ``-w/--workflow``, ``--cleanup``, ``--harvester-*``...): ``pilot.options.settings``.
* ``INERT``: options that mean nothing here.  They are accepted, and the pilot says
  at start, in one line each, that they have no effect and why; a value txpilot
  honours anyway (``--use-https true``) needs no notice.

pilot3's short letters and txpilot's agree (``-q -p -j -l -a -v -x -g -d`` mean the same
in both); ``-c`` (``--config``) is txpilot's alone and unused by pilot3.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pilot.options.settings import Converter, flag, str2bool, text
from pilot.util.records import record

#: pilot3 long name → the txpilot setting it sets.
ALIASES: Mapping[str, str] = {
    "joblabel": "job-label",
    "getjobrequests": "getjob-requests",
    "getjobfailures": "getjob-failures",
    "queuedata-url": "queuedata",
    "storagedata-url": "storagedata",
}

_STAGER = "it belongs to pilot3's stager workflow, which txpilot does not have"
_REALTIME = "txpilot has no real-time log shipping (its JSON log is --log-file)"
_HPC = "txpilot's HPC modes are Harvester's file exchange and Ray for many nodes (README), chosen otherwise"


@record(frozen=True)
class Inert:
    """A pilot3 option with no meaning in txpilot: accepted, and named in a notice.

    ``kind``: ``flag`` takes no value; ``value`` takes text; ``bool`` takes pilot3's
    str2bool value (``--use-https True``).  ``quiet``: a value that asks for what
    txpilot does anyway, so it needs no notice.
    """

    name: str
    short: str | None
    kind: Literal["flag", "value", "bool"]
    reason: str
    quiet: object = None

    @property
    def convert(self) -> Converter:
        return {"flag": flag, "bool": str2bool, "value": text}[self.kind](self.name)

    @property
    def label(self) -> str:
        """How the operator wrote it: ``-b/--nocvmfs``."""
        return f"-{self.short}/--{self.name}" if self.short else f"--{self.name}"


INERT: tuple[Inert, ...] = (
    Inert("redirect-stdout", None, "value", "twistd writes the console log (use twistd's --logfile)"),
    Inert("leasetime", "L", "value", _STAGER),
    Inert("resource", "r", "value", "obsolete in pilot3 too: the site comes from the queue's configuration"),
    Inert("site", "s", "value", "obsolete in pilot3 too: the site comes from the queue's configuration"),
    Inert("nocvmfs", "b", "flag", "txpilot does not check CVMFS at start"),
    Inert(
        "stageout-attempts",
        None,
        "value",
        "each output is tried once with every copytool and endpoint the queue lists",
        quiet="1",
    ),
    Inert("input-dir", None, "value", _STAGER),
    Inert("input-destination-dir", None, "value", _STAGER),
    Inert("output-dir", None, "value", _STAGER),
    Inert("hpc-resource", None, "value", _HPC),
    Inert("hpc-mode", None, "value", _HPC),
    Inert("es-executor-type", None, "value", _HPC),
    Inert("pod", None, "flag", "in a Kubernetes pod txpilot runs as on any worker node (Harvester pull mode)"),
    Inert(
        "noproxyverification",
        "t",
        "flag",
        "txpilot does not check the proxy's lifetime at start; the server refuses an unusable one",
    ),
    Inert("verifypayloadproxy", "u", "flag", "txpilot does not verify a payload's proxy"),
    Inert(
        "notokenrenewal",
        "y",
        "flag",
        "txpilot renews no token; it re-reads the token file when the file changes",
    ),
    Inert("noworkerpilotstatusupdate", "k", "flag", "txpilot does not send updateWorkerPilotStatus"),
    Inert("subscribe-to-msgsvc", None, "flag", "txpilot takes no instructions from a message service"),
    Inert("use-https", None, "bool", "txpilot reaches the server over https only", quiet=True),
    Inert("use-realtime-logging", None, "flag", _REALTIME),
    Inert("realtime-logging-server", None, "value", _REALTIME),
    Inert("realtime-logname", None, "value", _REALTIME),
    Inert("use-rucio-traces", None, "bool", "txpilot sends no Rucio traces", quiet=False),
    Inert("rucio-host", None, "value", "txpilot sends no Rucio traces; the rucio copytool uses its client's configuration"),
)  # fmt: skip

INERT_BY_NAME: dict[str, Inert] = {o.name: o for o in INERT}

#: Harvester's file locations (pilot3's ``--harvester-*`` options), kept in the config.
HARVESTER_FILES = (
    "harvester-workdir",
    "harvester-datadir",
    "harvester-eventstatusdump",
    "harvester-workerattributes",
)

_WORKFLOW = "txpilot runs the generic workflow only"


def notice(labels: list[str], reason: str) -> str:
    """The one line logged at start for options that do nothing here."""
    if len(labels) == 1:
        return f"option {labels[0]} has no effect in txpilot: {reason}"
    return f"options {', '.join(labels)} have no effect in txpilot: {reason}"


def inert_notices(given: Mapping[str, Any]) -> list[str]:
    """Notices for the inert options that were given (converted values), one line per reason."""
    by_reason: dict[str, list[str]] = {}
    for option in INERT:
        value = given.get(option.name)
        if value is None:
            continue
        if (option.kind == "flag" and value is False) or (option.quiet is not None and value == option.quiet):
            continue
        by_reason.setdefault(option.reason, []).append(option.label)
    return [notice(labels, reason) for reason, labels in by_reason.items()]


def setting_notices(values: Mapping[str, Any]) -> list[str]:
    """Notices for txpilot settings (named after pilot3's) whose values it cannot honour yet."""
    lines: list[str] = []
    if values["workflow"] != "generic":
        lines.append(notice([f"-w/--workflow {values['workflow']}"], _WORKFLOW))
    return lines


def job_label_for(label: str, version_tag: str) -> str:
    """The prodSourceLabel pilot3 asks for, given its version tag.

    pilot3's release-candidate pilots ask for their own labels: RCM with the default
    ``ptest`` asks for ``rcm_test2``, ALRB always for ``rc_alrb``.
    """
    if version_tag == "RCM" and label == "ptest":
        return "rcm_test2"
    if version_tag == "ALRB":
        return "rc_alrb"
    return label
