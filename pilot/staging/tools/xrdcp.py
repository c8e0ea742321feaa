"""XRootD with ``xrdcp``.

``xrdcp --cksum adler32:<value>`` has the destination side compute the checksum and
compare it with the value we pass (the catalogue's value on stage-in, ours on
stage-out), and ``--rm-bad-cksum`` removes a copy that does not match; so both
directions are verified at the far end by XRootD itself.  ``XRD_*`` settings in
the environment keep a dead endpoint from hanging a transfer for minutes.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from zope.interface import implementer

from pilot.errorcodes import ErrorCode
from pilot.interfaces import ICopyTool
from pilot.job.model import Checksum
from pilot.staging.tools.base import ToolContext, failed, find_executable, run_command
from pilot.staging.transfer import CopyRequest, CopyResult

#: Fail fast on unreachable endpoints instead of XrdCl's default minutes of retries.
XRD_DEFAULTS = {"XRD_CONNECTIONRETRY": "2", "XRD_CONNECTIONWINDOW": "10", "XRD_REQUESTTIMEOUT": "300"}


@implementer(ICopyTool)
class XrdcpTool:
    name = "xrdcp"
    schemes = frozenset({"root", "roots", "xroot", "xroots"})
    resolves_replicas = False

    def copy_in(self, request: CopyRequest, context: ToolContext) -> Deferred[CopyResult]:
        return Deferred.fromCoroutine(self._copy(request, context, request.remote, str(request.local)))

    def copy_out(self, request: CopyRequest, context: ToolContext) -> Deferred[CopyResult]:
        return Deferred.fromCoroutine(self._copy(request, context, str(request.local), request.remote))

    async def _copy(
        self, request: CopyRequest, context: ToolContext, source: str, destination: str
    ) -> CopyResult:
        code = ErrorCode.STAGEINFAILED if request.stage_in else ErrorCode.STAGEOUTFAILED
        program = find_executable("xrdcp", context.env, code)
        argv = [program, "--force", "--nopbar", "--path"]
        verified = False
        if isinstance(request.checksum, Checksum) and request.checksum.algorithm == "adler32":
            argv += ["--cksum", f"adler32:{request.checksum.value}", "--rm-bad-cksum"]
            verified = True
        argv += [source, destination]
        env = {**XRD_DEFAULTS, **context.env}
        output = await run_command(context, argv, request, tool=self.name, env=env)
        if output.exit_code != 0:
            raise failed(output, request, self.name)
        return CopyResult(
            remote_checksum=request.checksum if verified else None,
            remote_url=request.remote,
            verified_remotely=verified and not request.stage_in,
        )


xrdcp = XrdcpTool()
