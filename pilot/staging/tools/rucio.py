"""Rucio: downloads by DID (Rucio picks the replica) and uploads to an RSE by name.

The transfer runs ``pilot/data/rucio_transfer.py`` with the rucio-clients interpreter — the one
in ``$RUCIO_PYTHON``, or the one the ``rucio`` command on PATH runs with — so the
trace fields are sent and nothing secret appears on a command line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from pilot.errorcodes import ErrorCode
from pilot.model.job import Checksum
from pilot.staging.errors import classify
from pilot.staging.interfaces import ICopyTool
from pilot.staging.tools.base import ToolContext, find_executable, run_command
from pilot.staging.transfer import CopyRequest, CopyResult, TransferError

#: Kept among the data files: the directory of a script is first on its sys.path, and
#: ours must not hold modules (like this one, ``rucio.py``) that shadow Rucio's.
HELPER = Path(__file__).resolve().parent.parent.parent / "data" / "rucio_transfer.py"


def _interpreter_of(script: str) -> str:
    with open(script, "rb") as handle:
        first = handle.readline(512).decode("utf-8", errors="replace").strip()
    if not first.startswith("#!"):
        raise ValueError(f"{script} has no interpreter line")
    return first[2:].split()[0]


@implementer(ICopyTool)
class RucioTool:
    name = "rucio"
    schemes = frozenset({"rucio"})
    resolves_replicas = True

    def copy_in(self, request: CopyRequest, context: ToolContext) -> Deferred[CopyResult]:
        return Deferred.fromCoroutine(self._download(request, context))

    def copy_out(self, request: CopyRequest, context: ToolContext) -> Deferred[CopyResult]:
        return Deferred.fromCoroutine(self._upload(request, context))

    async def _python(self, context: ToolContext, request: CopyRequest) -> str:
        explicit = context.env.get("RUCIO_PYTHON")
        if explicit:
            return explicit
        code = ErrorCode.STAGEINFAILED if request.stage_in else ErrorCode.STAGEOUTFAILED
        rucio = find_executable("rucio", context.env, code)
        try:
            return await context.in_thread(_interpreter_of, rucio)
        except (OSError, ValueError) as exc:
            raise TransferError(
                code, f"cannot find the rucio-clients Python: {exc}", retry_elsewhere=False
            ) from None

    def _trace(self, request: CopyRequest, context: ToolContext, event: str) -> dict[str, Any]:
        trace = {
            "eventType": event,
            "appid": context.setup.get("appid", "txpilot"),
            "remoteSite": request.endpoint,
        }
        trace.update({k: v for k, v in context.setup.get("trace", {}).items() if isinstance(v, str)})
        return trace

    async def _run(
        self, request: CopyRequest, context: ToolContext, action: str, payload: dict[str, Any]
    ) -> dict[str, Any]:
        python = await self._python(context, request)
        output = await run_command(
            context,
            [python, str(HELPER), action, json.dumps(payload)],
            request,
            tool=self.name,
            cwd=request.local.parent,
        )
        lines = [line for line in output.output.splitlines() if line.startswith("{")]
        try:
            result: dict[str, Any] = json.loads(lines[-1]) if lines else {}
        except ValueError:
            result = {}
        if output.exit_code == 0 and result.get("ok"):
            return result
        text = str(result.get("error") or output.output or f"rucio {action} failed")
        error = classify(text, stage_in=request.stage_in)
        if result.get("missing"):
            error = TransferError(ErrorCode.MISSINGINPUTFILE, text[-200:], missing=True)
        error.detail = f"rucio {action}: {error.detail}"
        raise error

    async def _download(self, request: CopyRequest, context: ToolContext) -> CopyResult:
        payload = {
            "did": request.remote,
            "directory": str(request.local.parent),
            "rse": request.endpoint,
            "timeout": int(request.timeout),
            "trace": self._trace(request, context, "get_sm"),
        }
        await self._run(request, context, "download", payload)
        return CopyResult(remote_url=request.remote)

    async def _upload(self, request: CopyRequest, context: ToolContext) -> CopyResult:
        payload = {
            "path": str(request.local),
            "rse": request.remote,
            "scope": request.scope,
            "name": request.lfn,
            "guid": request.guid,
            "timeout": int(request.timeout),
            "summary": str(context.next_log(self.name, request.lfn).with_suffix(".summary.json")),
            "trace": self._trace(request, context, "put_sm"),
        }
        result = await self._run(request, context, "upload", payload)
        remote = result.get("adler32")
        checksum = Checksum("adler32", str(remote).zfill(8)) if remote else None
        return CopyResult(
            remote_checksum=checksum, remote_url=str(result.get("pfn") or ""), verified_remotely=bool(remote)
        )


rucio = RucioTool()
