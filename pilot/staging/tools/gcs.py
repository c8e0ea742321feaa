"""Google Cloud Storage (``gs``) through its JSON API, with treq.

URLs are ``gs://bucket/object``.  The API address comes from the protocol's
``settings["api"]`` (default ``https://storage.googleapis.com``; an emulator's
address in tests).  Authentication is a bearer token (``pilot.staging.credentials``)
or, when ``settings["signed_url"]`` is given, that pre-signed URL is used as is.
Uploads are compared with the object's ``md5Hash`` the service returns.
"""

from __future__ import annotations

import base64
import json
from urllib.parse import quote, urlsplit

import treq
from twisted.internet.defer import Deferred
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers
from zope.interface import implementer

from pilot.errorcodes import ErrorCode
from pilot.staging.interfaces import ICopyTool
from pilot.staging.tools.base import ToolContext
from pilot.staging.tools.streaming import CountingReader, receive_download
from pilot.staging.transfer import CopyRequest, CopyResult, TransferError
from pilot.util.checksum import file_facts

DEFAULT_API = "https://storage.googleapis.com"


def split_gs(remote: str) -> tuple[str, str]:
    parts = urlsplit(remote)
    name = parts.path.lstrip("/")
    if parts.scheme != "gs" or not parts.netloc or not name:
        raise TransferError(
            ErrorCode.STAGEINFAILED, f"not a gs://bucket/object URL: {remote}", retry_elsewhere=False
        )
    return parts.netloc, name


@implementer(ICopyTool)
class GcsTool:
    name = "gs"
    schemes = frozenset({"gs"})
    resolves_replicas = False

    def copy_in(self, request: CopyRequest, context: ToolContext) -> Deferred[CopyResult]:
        return Deferred.fromCoroutine(self._get(request, context))

    def copy_out(self, request: CopyRequest, context: ToolContext) -> Deferred[CopyResult]:
        return Deferred.fromCoroutine(self._put(request, context))

    def _headers(self, request: CopyRequest, context: ToolContext) -> Headers:
        headers = Headers()
        if not request.settings.get("signed_url"):
            token = context.credentials.gcs_token(request.settings)
            if token:
                headers.setRawHeaders(b"authorization", [f"Bearer {token}".encode()])
        return headers

    def _api(self, request: CopyRequest) -> str:
        return str(request.settings.get("api", DEFAULT_API)).rstrip("/")

    async def _get(self, request: CopyRequest, context: ToolContext) -> CopyResult:
        assert context.http is not None, "GCS needs an HTTP client"
        bucket, name = split_gs(request.remote)
        url = str(
            request.settings.get("signed_url")
            or f"{self._api(request)}/storage/v1/b/{bucket}/o/{quote(name, safe='')}?alt=media"
        )
        response = await context.http.get(url, headers=self._headers(request, context))
        return await receive_download(response, request, self._error, context.in_thread)

    async def _put(self, request: CopyRequest, context: ToolContext) -> CopyResult:
        assert context.http is not None, "GCS needs an HTTP client"
        bucket, name = split_gs(request.remote)
        facts = await context.in_thread(file_facts, request.local, md5=True)
        signed = request.settings.get("signed_url")
        url = str(
            signed
            or f"{self._api(request)}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={quote(name, safe='')}"
        )
        headers = self._headers(request, context)
        headers.setRawHeaders(b"content-type", [b"application/octet-stream"])
        handle = request.local.open("rb")
        try:
            producer = FileBodyProducer(CountingReader(handle, request.progress))  # type: ignore[no-untyped-call]
            if signed:
                response = await context.http.put(url, data=producer, headers=headers)
            else:
                response = await context.http.post(url, data=producer, headers=headers)
            body = await treq.content(response)
        finally:
            handle.close()
        if response.code not in (200, 201):
            raise self._error(response.code, body[:300].decode("utf-8", errors="replace"), request)
        verified = False
        try:
            stored = json.loads(body).get("md5Hash")
        except (ValueError, AttributeError):
            stored = None
        if stored:
            stored_hex = base64.b64decode(stored).hex()
            if stored_hex != facts.md5:
                raise TransferError(
                    ErrorCode.PUTMD5MISMATCH, f"{request.lfn}: stored md5 {stored_hex} != local {facts.md5}"
                )
            verified = True
        return CopyResult(
            remote_checksum=request.checksum, remote_url=request.remote, verified_remotely=verified
        )

    def _error(self, status: int, body: str, request: CopyRequest) -> TransferError:
        if status == 404 and request.stage_in:
            return TransferError(ErrorCode.MISSINGINPUTFILE, f"{request.remote}: 404 not found", missing=True)
        if status in (401, 403):
            code = (
                ErrorCode.STAGEINAUTHENTICATIONFAILURE
                if request.stage_in
                else ErrorCode.STAGEOUTAUTHENTICATIONFAILURE
            )
            return TransferError(code, f"{request.remote}: HTTP {status} {body}")
        code = ErrorCode.STAGEINFAILED if request.stage_in else ErrorCode.STAGEOUTFAILED
        return TransferError(code, f"{request.remote}: HTTP {status} {body}")


gs = GcsTool()
