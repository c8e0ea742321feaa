"""Local and shared file systems: ``cp``, ``mv`` and ``ln`` (symbolic link, stage-in only).

Used where storage is mounted on the worker node (NFS, CephFS, EOS FUSE) or where
Harvester/ARC placed the inputs beside the job.  ``mv`` moves the source away, as
sites that hand over files in a directory expect.  The work happens in child
processes (``cp``/``mv``/``ln``), so a stuck file system never blocks the pilot.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.defer import Deferred
from zope.interface import implementer

from pilot.errorcodes import ErrorCode
from pilot.staging.interfaces import ICopyTool
from pilot.staging.tools.base import ToolContext, find_executable, run_copy
from pilot.staging.transfer import CopyRequest, CopyResult, TransferError
from pilot.staging.urls import local_path


@implementer(ICopyTool)
class LocalCopyTool:
    """``cp``/``mv``/``ln`` between the work directory and a mounted file system."""

    schemes = frozenset({"file"})
    resolves_replicas = False

    def __init__(
        self, name: str, program: str, arguments: tuple[str, ...], *, can_stage_out: bool = True
    ) -> None:
        self.name = name
        self._program = program
        self._arguments = arguments
        self._can_stage_out = can_stage_out

    def copy_in(self, request: CopyRequest, context: ToolContext) -> Deferred[CopyResult]:
        return Deferred.fromCoroutine(
            self._copy(request, context, local_path(request.remote), str(request.local))
        )

    def copy_out(self, request: CopyRequest, context: ToolContext) -> Deferred[CopyResult]:
        if not self._can_stage_out:
            raise TransferError(
                ErrorCode.STAGEOUTFAILED, f"{self.name} cannot stage out", retry_elsewhere=True
            )
        return Deferred.fromCoroutine(
            self._copy(request, context, str(request.local), local_path(request.remote))
        )

    async def _copy(
        self, request: CopyRequest, context: ToolContext, source: str, destination: str
    ) -> CopyResult:
        program = find_executable(
            self._program,
            context.env,
            ErrorCode.STAGEINFAILED if request.stage_in else ErrorCode.STAGEOUTFAILED,
        )
        if request.stage_in and not await context.in_thread(Path(source).exists):
            raise TransferError(
                ErrorCode.MISSINGINPUTFILE, f"{source}: No such file or directory", missing=True
            )
        created = False
        if not request.stage_in:
            created = not await context.in_thread(_prepare_destination, Path(destination))
        try:
            await run_copy(
                context, [program, *self._arguments, "--", source, destination], request, tool=self.name
            )
        except BaseException:
            if created:  # a partial copy on the storage is worse than none
                await context.in_thread(Path(destination).unlink, True)
            raise
        return CopyResult(remote_url=request.remote)


def _prepare_destination(destination: Path) -> bool:
    """Create the destination's directories; whether the destination file already existed."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    return destination.exists()


cp = LocalCopyTool("cp", "cp", ("--preserve=timestamps",))
mv = LocalCopyTool("mv", "mv", ())
ln = LocalCopyTool("ln", "ln", ("-s",), can_stage_out=False)
