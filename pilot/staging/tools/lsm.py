"""Site-provided ``lsm-get`` / ``lsm-put`` commands (the "local site mover").

Argument convention as in PanDA Pilot 3: ``lsm-get SOURCE DESTINATION`` and
``lsm-put --size BYTES -t SPACE_TOKEN --checksum adler32:VALUE --guid GUID SOURCE
DESTINATION``; the command verifies the checksum it is given.  A setup script
(queuedata ``copytools.lsm.setup``) is not sourced: sites put the commands on PATH.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from zope.interface import implementer

from pilot.errorcodes import ErrorCode
from pilot.staging.interfaces import ICopyTool
from pilot.staging.tools.base import ToolContext, find_executable, run_copy
from pilot.staging.transfer import CopyRequest, CopyResult


@implementer(ICopyTool)
class LsmTool:
    name = "lsm"
    schemes = frozenset({"root", "srm", "gsiftp", "davs", "https", "file"})
    resolves_replicas = False

    def copy_in(self, request: CopyRequest, context: ToolContext) -> Deferred[CopyResult]:
        return Deferred.fromCoroutine(self._get(request, context))

    def copy_out(self, request: CopyRequest, context: ToolContext) -> Deferred[CopyResult]:
        return Deferred.fromCoroutine(self._put(request, context))

    async def _get(self, request: CopyRequest, context: ToolContext) -> CopyResult:
        program = find_executable("lsm-get", context.env, ErrorCode.STAGEINFAILED)
        await run_copy(context, [program, request.remote, str(request.local)], request, tool=self.name)
        return CopyResult(remote_url=request.remote)

    async def _put(self, request: CopyRequest, context: ToolContext) -> CopyResult:
        program = find_executable("lsm-put", context.env, ErrorCode.STAGEOUTFAILED)
        argv = [program]
        if request.size is not None:
            argv += ["--size", str(request.size)]
        if request.token:
            argv += ["-t", request.token]
        if request.checksum is not None and request.checksum.algorithm == "adler32":
            argv += ["--checksum", f"adler32:{request.checksum.value}"]
        if request.guid:
            argv += ["--guid", request.guid]
        argv += [str(request.local), request.remote]
        await run_copy(context, argv, request, tool=self.name)
        return CopyResult(remote_checksum=request.checksum, remote_url=request.remote, verified_remotely=True)


lsm = LsmTool()
