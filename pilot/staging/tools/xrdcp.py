"""XRootD with ``xrdcp``.

On stage-out ``xrdcp --cksum adler32:<value>`` has the storage compute the checksum of
what it received and compare it with ours, and ``--rm-bad-cksum`` removes a copy that
does not match: the output is verified at the far end.  On stage-in the engine
checksums the copy itself, while xrdcp writes it (``pilot.staging.follow``), which
costs less than xrdcp's own ``--cksum`` pass over the local file after the copy.  ``XRD_*`` settings in
the environment keep a dead endpoint from hanging a transfer for minutes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from twisted.internet.defer import Deferred
from zope.interface import implementer

from pilot.errorcodes import ErrorCode
from pilot.model.job import Checksum
from pilot.staging.errors import classify
from pilot.staging.interfaces import IBulkCopyTool, ICopyTool
from pilot.staging.tools.base import ToolContext, find_executable, run_command, run_copy
from pilot.staging.transfer import CopyRequest, CopyResult, TransferError

#: Fail fast on unreachable endpoints instead of XrdCl's default minutes of retries.
XRD_DEFAULTS = {"XRD_CONNECTIONRETRY": "2", "XRD_CONNECTIONWINDOW": "10", "XRD_REQUESTTIMEOUT": "300"}


@implementer(ICopyTool, IBulkCopyTool)
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
        if (
            not request.stage_in
            and isinstance(request.checksum, Checksum)
            and request.checksum.algorithm == "adler32"
        ):
            argv += ["--cksum", f"adler32:{request.checksum.value}", "--rm-bad-cksum"]
            verified = True
        argv += [source, destination]
        env = {**XRD_DEFAULTS, **context.env}
        await run_copy(context, argv, request, tool=self.name, env=env)
        return CopyResult(
            remote_checksum=request.checksum if verified else None,
            remote_url=request.remote,
            verified_remotely=verified,
        )

    #: Transfers xrdcp runs at once inside one bulk invocation.
    bulk_parallel = 4

    def copy_in_bulk(
        self, requests: Sequence[CopyRequest], context: ToolContext
    ) -> Deferred[list[CopyResult | TransferError]]:
        return Deferred.fromCoroutine(self._bulk_in(requests, context))

    async def _bulk_in(
        self, requests: Sequence[CopyRequest], context: ToolContext
    ) -> list[CopyResult | TransferError]:
        """``xrdcp --parallel N src1 ... srcN workdir/``: files keep their names (the LFNs).

        No ``--cksum`` here: with one value per file impossible on one command line,
        xrdcp would ask the server to checksum every source, which is slow for large
        files and refused by xrootd under load ("error while querying the checksum").
        The engine verifies each copy against the job definition instead.
        """
        program = find_executable("xrdcp", context.env, ErrorCode.STAGEINFAILED)
        directory = requests[0].local.parent
        argv = [program, "--force", "--nopbar", "--path", "--parallel", str(self.bulk_parallel)]
        argv += [*(r.remote for r in requests), f"{directory}/"]
        env = {**XRD_DEFAULTS, **context.env}
        output = await run_command(context, argv, requests[0], tool=self.name, env=env)
        results: list[CopyResult | TransferError] = []
        for request in requests:
            if output.exit_code == 0 or _arrived(request.local, request.size):
                results.append(CopyResult(remote_url=request.remote))
                continue
            lines = [line for line in output.output.splitlines() if request.remote.split("//", 2)[-1] in line]
            error = classify("\n".join(lines) or output.output, stage_in=True)
            error.detail = f"xrdcp: {error.detail}"
            results.append(error)
        return results


def _arrived(path: Path, size: int | None) -> bool:
    try:
        return size is None or path.stat().st_size == size
    except OSError:
        return False


xrdcp = XrdcpTool()
