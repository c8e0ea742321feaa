"""The contract of a copytool: moving files between the work directory and storage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from pilot.staging.tools.base import ToolContext
    from pilot.staging.transfer import CopyRequest, CopyResult, TransferError


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
