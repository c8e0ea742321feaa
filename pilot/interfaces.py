"""Contracts between the pilot core and experiment plug-ins.

An experiment (ATLAS, or a small VO) customises the pilot through an ``IExperiment``
plug-in, selected once at start-up with ``--pilot-user <name>`` and found with
``twisted.plugin.getPlugins`` among the drop-ins of ``twisted/plugins/``.  The
pilot core never imports experiment code by module path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from zope.interface import Attribute, Interface

from pilot.job.model import Job

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from pilot.container.spec import ContainerSpec, Launch
    from pilot.job.payload_analysis import PayloadAnalysis
    from pilot.job.processes import UtilitySpec
    from pilot.queuedata import QueueData
    from pilot.staging.tools.base import ToolContext
    from pilot.staging.transfer import CopyRequest, CopyResult, TransferError


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


class IContainerRuntime(Interface):
    """A way of running one process in a container (``pilot.container``)."""

    name = Attribute("The runtime's name as used in container_type (str).")

    def available(environ: Mapping[str, str]) -> bool:
        """Whether the runtime's executable is installed (on ``environ``'s PATH)."""

    def wrap(spec: ContainerSpec, environ: Mapping[str, str]) -> Launch:
        """The launcher argv and environment that run ``spec`` in a container.

        ``environ`` is the pilot's environment (to find executables).  Secrets in
        ``spec.env`` must never end up on the launcher's command line.  Raises
        ``FileNotFoundError`` when the runtime is not installed, ``ImageError`` (a
        ``ValueError``) for an image problem and ``ValueError`` for anything else it
        cannot honour.
        """


class ICopyTool(Interface):
    """A way of moving files between the work directory and storage.

    Tools are stateless objects registered by name (``pilot.staging.registry``);
    the staging engine calls them once per attempt, with a time-out it enforces by
    cancelling the Deferred the tool returned.  Tools never block the reactor: they
    run child processes (``ProcessProtocol``) or speak HTTP with treq.
    """

    name = Attribute("Registry name as used in queuedata copytools (str).")
    schemes = Attribute("URL schemes the tool reads and writes (frozenset of str).")
    resolves_replicas = Attribute(
        "True when the tool finds sources itself from scope:lfn and uploads to an RSE by name (Rucio)."
    )

    def copy_in(request: CopyRequest, context: ToolContext) -> Deferred[CopyResult]:
        """Copy ``request.remote`` to ``request.local``; a Deferred firing with a CopyResult.

        Fails with ``TransferError`` (PanDA code, ``missing`` when the source does
        not exist).  The caller verifies size and checksum afterwards.
        """

    def copy_out(request: CopyRequest, context: ToolContext) -> Deferred[CopyResult]:
        """Copy ``request.local`` to ``request.remote``; a Deferred firing with a CopyResult.

        ``request.checksum`` holds the local adler32; tools that can verify it on
        the remote side do so and say so in the result.
        """


class IBulkCopyTool(ICopyTool):
    """A copytool that can fetch many files in one go (one process, its own parallelism).

    Starting a process per small file costs more than moving it; the engine hands
    such tools batches of stage-in requests with the same source endpoint.
    """

    def copy_in_bulk(
        requests: Sequence[CopyRequest], context: ToolContext
    ) -> Deferred[list[CopyResult | TransferError]]:
        """Fetch every request; one result per request, in order (a TransferError for a failed one)."""
