"""Contracts between the pilot core and experiment plug-ins.

An experiment (ATLAS, or a small VO) customises the pilot through an ``IExperiment``
plug-in, selected once at start-up with ``--pilot-user <name>`` and found with
``twisted.plugin.getPlugins`` among the drop-ins of ``twisted/plugins/``.  The
pilot core never imports experiment code by module path.

The runtime and copytool contracts live beside their machinery
(``pilot.container.interfaces``, ``pilot.staging.interfaces``) and are re-exported
here, so a plug-in author finds every contract in one place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from zope.interface import Attribute, Interface

from pilot.container.interfaces import IContainerRuntime
from pilot.model.job import Job
from pilot.staging.interfaces import IBulkCopyTool, ICopyTool

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from pilot.model.processes import UtilitySpec
    from pilot.monitor.payload_analysis import PayloadAnalysis
    from pilot.queuedata import QueueData
    from pilot.server.client import AcquireResult, JobRequest, JobUpdate, UpdateResult
    from pilot.server.events import EventRangeRequest, EventRangeUpdate, EventUpdateResult


class IExperiment(Interface):
    """How an experiment turns a PanDA job into a payload process."""

    name = Attribute("The plug-in's name, as given to --pilot-user (str).")

    def payload_command(job: Job, transformation: str, workdir: Path) -> str:
        """The shell command (run with ``/bin/bash -c`` in ``workdir``) of ``job``'s payload.

        ``transformation`` is the job's transformation, already replaced by the
        path of the downloaded file when it was a URL.  ``job.payload_args`` (``jobPars``
        without ``--containerImage``, which the pilot handles) has shell
        semantics (PanDA's contract).  Nothing pilot-side (credentials, pilot paths)
        may be spliced into the command: pass such things in the environment.
        """

    def payload_environment(job: Job, workdir: Path, base: Mapping[str, str]) -> dict[str, str]:
        """The payload's environment, given the pilot's explicit ``base`` environment."""

    def input_environment(job: Job, catalog: Path, turls: Mapping[str, str]) -> dict[str, str]:
        """Variables telling the payload where its inputs are.

        ``catalog`` is the ``PoolFileCatalog.xml`` listing every input (local path
        or, for direct access, remote URL); ``turls`` maps the LFNs read remotely
        to their URLs.
        """

    def adjust_queuedata(queuedata: QueueData) -> QueueData:
        """The queue configuration as this experiment wants it (called once, at start-up)."""

    def verify_setup(job: Job, workdir: Path) -> str | None:
        """Check that the job can run here before anything is staged; a problem's text or None.

        A problem fails the job with SETUPFAILURE (e.g. a release that is not installed).
        Runs in a worker thread: it may look at the file system, never at the network.
        """

    def utilities(job: Job, queuedata: QueueData, workdir: Path) -> Sequence[UtilitySpec]:
        """Utility processes to run before, with or after the payload (see ``UtilitySpec``)."""

    def analyse_payload(job: Job, workdir: Path, analysis: PayloadAnalysis) -> PayloadAnalysis:
        """Refine the generic analysis of the payload's exit, output and job report."""

    def log_tarball_name(job: Job) -> str:
        """The log tarball's file name (PanDA's ``logFile`` unless the experiment knows better)."""

    def file_catalog_name(job: Job) -> str:
        """The name of the input file catalogue written in the work directory."""

    def container_runtime(role: str, job: Job, queuedata: QueueData) -> str | None:
        """The runtime (``bubblewrap``, ``apptainer``...) for a process role, or None for none.

        Roles are ``pilot.container.spec.ROLES``.  The generic answer reads the queue's
        ``container_type`` (``runtime:role;...``) and the job's image.
        """

    def container_image(job: Job, queuedata: QueueData) -> str | None:
        """The image for image-based runtimes (``--containerImage`` in jobPars, ``container_name``)."""


class IJobSource(Interface):
    """Where the pilot's jobs come from: the PanDA server today, Harvester's files later.

    The job loop asks a source for work and nothing else; how the request travels (HTTPS
    with retries, a file exchange) is the source's business.  Logical outcomes (no job,
    the server's refusal) are results with a ``StatusCode``; exceptions
    (``pilot.server.client.ServerError``) mean the exchange itself failed.
    """

    name = Attribute("A short name for logs and the summary (str), e.g. 'panda'.")
    calls = Attribute("How many requests the source has made so far (int), for the summary.")

    def acquire_jobs(request: JobRequest) -> Deferred[AcquireResult]:
        """Ask once for jobs matching ``request``.

        Not idempotent: a source must not repeat a request that may have dispatched a
        job, since the job would then be lost.
        """


class IJobReporter(Interface):
    """Where a job's updates go (heartbeats, state changes, the final update).

    Ordering, heartbeat skipping and the final update's retries until the deadline are
    the job's own (``pilot.job.updates``); a reporter delivers one update.  It may adapt
    the update to its channel (a server's column widths) but never drops one silently.
    """

    def update_job(update: JobUpdate, *, final: bool, timeout: float | None) -> Deferred[UpdateResult]:
        """Deliver ``update``; its outcome and the commands that came back.

        ``final``: the caller retries on its own clock until its deadline, so one attempt
        is enough; otherwise the reporter may retry transport failures.  ``timeout``
        bounds one attempt (None: the reporter's default).  Fails with ``ServerError``
        when the update could not be delivered.
        """


__all__ = ["IBulkCopyTool", "IContainerRuntime", "ICopyTool", "IExperiment", "IJobReporter", "IJobSource"]


class IEventSource(Interface):
    """Where an event-service job's ranges come from and their statuses go.

    The PanDA server (both API generations) today, Harvester's files later; the event
    service machinery (``pilot.eventservice``) speaks only to this interface.
    """

    def acquire_event_ranges(request: EventRangeRequest) -> Deferred[list[dict[str, object]]]:
        """Ask once for up to ``request.n_ranges`` ranges: the range objects as sent.

        An empty list means the server has no more ranges for the job.  Not idempotent:
        ranges handed out in a reply that was lost belong to the job all the same, so a
        source must not repeat a request that may have reached the server.  Fails with
        ``ServerError`` when the exchange failed.
        """

    def update_event_ranges(update: EventRangeUpdate) -> Deferred[EventUpdateResult]:
        """Report ``update`` (version 0 statuses or version 1 archive chunks) exactly once.

        A source whose server may have committed a report it then failed to answer
        (panda-server 1.0.4's ``update_event_ranges`` answers HTTP 500 after the commit)
        confirms the outcome before anything is sent again, or uses a call that answers
        reliably.  Fails with ``pilot.server.events.RangesNotRecorded`` when part of the
        report is known to be recorded (its ``settled`` result) and the rest is not, and
        with another ``ServerError`` when the report could not be delivered; in both cases
        resending the ranges not settled is safe (the source reads back anything whose
        outcome it does not know before sending it again).
        """
