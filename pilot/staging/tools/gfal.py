"""gfal2 with ``gfal-copy``: root://, davs://, https://, gsiftp://, srm://, file:// and s3:// URLs.

``-K ADLER32:<value>`` with ``--checksum-mode both`` makes gfal2 check source and
destination against the value (the catalogue's on stage-in, ours on stage-out);
gfal2 cleans up a destination whose transfer failed.  Sites whose gfal scripts need
a particular Python set ``GFAL_PYTHONBIN`` in the pilot's environment (passed on).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from zope.interface import implementer

from pilot.errorcodes import ErrorCode
from pilot.staging.interfaces import ICopyTool
from pilot.staging.tools.base import ToolContext, find_executable, run_copy
from pilot.staging.tools.xrdcp import XRD_DEFAULTS
from pilot.staging.transfer import CopyRequest, CopyResult


def _file_url(path: str) -> str:
    return f"file://{path}"


@implementer(ICopyTool)
class GfalTool:
    name = "gfal"
    schemes = frozenset({"root", "roots", "davs", "https", "http", "dav", "gsiftp", "srm", "file"})
    resolves_replicas = False

    def copy_in(self, request: CopyRequest, context: ToolContext) -> Deferred[CopyResult]:
        return Deferred.fromCoroutine(
            self._copy(request, context, request.remote, _file_url(str(request.local)))
        )

    def copy_out(self, request: CopyRequest, context: ToolContext) -> Deferred[CopyResult]:
        return Deferred.fromCoroutine(
            self._copy(request, context, _file_url(str(request.local)), request.remote)
        )

    async def _copy(
        self, request: CopyRequest, context: ToolContext, source: str, destination: str
    ) -> CopyResult:
        code = ErrorCode.STAGEINFAILED if request.stage_in else ErrorCode.STAGEOUTFAILED
        program = find_executable("gfal-copy", context.env, code)
        argv = [program, "--force", "--parent", "--timeout", str(int(request.timeout))]
        verified = False
        if request.checksum is not None:
            algorithm = "ADLER32" if request.checksum.algorithm == "adler32" else "MD5"
            argv += ["--checksum", f"{algorithm}:{request.checksum.value}", "--checksum-mode", "both"]
            verified = True
        argv += [source, destination]
        env = {**XRD_DEFAULTS, **context.env}
        await run_copy(context, argv, request, tool=self.name, env=env)
        return CopyResult(
            remote_checksum=request.checksum if verified else None,
            remote_url=request.remote,
            verified_remotely=verified and not request.stage_in,
        )


gfal = GfalTool()
