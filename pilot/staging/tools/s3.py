"""S3 object stores (``s3`` and ``objectstore``), spoken directly over HTTP with treq.

URLs are ``s3://host[:port]/bucket/key``; the protocol's ``settings`` say whether
to use TLS (``secure``, default true), the ``region`` (default us-east-1) and where
the keys are (see ``pilot.staging.credentials``).  Requests are signed with AWS
Signature Version 4 in this process: keys never appear on a command line, in a
log, or in a child's environment.  Uploads send ``Content-MD5`` so the store
rejects a corrupted body, and the returned ETag (the MD5 of a single-part object)
is compared with ours.  Single-part uploads only: objects up to 5 GiB.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit

from twisted.internet.defer import Deferred
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers
from zope.interface import implementer

from pilot.errorcodes import ErrorCode
from pilot.staging.credentials import S3Keys
from pilot.staging.interfaces import ICopyTool
from pilot.staging.tools.base import ToolContext
from pilot.staging.tools.streaming import CountingReader, body_snippet, receive_download
from pilot.staging.transfer import CopyRequest, CopyResult, TransferError
from pilot.util.checksum import file_facts

MAX_SINGLE_PUT = 5 * 1024**3
UNSIGNED = "UNSIGNED-PAYLOAD"


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()


def sign_v4(
    method: str,
    url: str,
    headers: Mapping[str, str],
    keys: S3Keys,
    *,
    region: str,
    now: datetime.datetime,
    payload_hash: str = UNSIGNED,
    service: str = "s3",
) -> dict[str, str]:
    """Headers for an AWS Signature Version 4 request (``Authorization`` and friends)."""
    parts = urlsplit(url)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = now.strftime("%Y%m%d")
    signed = {k.lower(): " ".join(v.split()) for k, v in headers.items()}
    signed.update({"host": parts.netloc, "x-amz-date": amz_date, "x-amz-content-sha256": payload_hash})
    names = sorted(signed)
    query = "&".join(
        sorted(
            f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}"
            for k, _, v in (item.partition("=") for item in parts.query.split("&") if item)
        )
    )
    canonical = "\n".join(
        [
            method,
            quote(parts.path or "/", safe="/-_.~"),
            query,
            "".join(f"{n}:{signed[n]}\n" for n in names),
            ";".join(names),
            payload_hash,
        ]
    )
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(f"AWS4{keys.secret_key}".encode(), day), region), service), "aws4_request")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    result = {k: v for k, v in signed.items() if k != "host"}
    result["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={keys.access_key}/{scope}, SignedHeaders={';'.join(names)}, Signature={signature}"
    )
    return result


def http_url(remote: str, settings: Mapping[str, Any]) -> str:
    """``s3://host/bucket/key`` → the path-style HTTP(S) URL of the object."""
    parts = urlsplit(remote)
    if parts.scheme != "s3" or not parts.netloc or parts.path.count("/") < 2:
        raise TransferError(
            ErrorCode.STAGEINFAILED, f"not an s3://host/bucket/key URL: {remote}", retry_elsewhere=False
        )
    secure = settings.get("secure", True)
    scheme = "https" if secure not in (False, "false", "False", 0) else "http"
    return f"{scheme}://{parts.netloc}{quote(parts.path, safe='/-_.~')}"


@implementer(ICopyTool)
class S3Tool:
    schemes = frozenset({"s3"})
    resolves_replicas = False

    def __init__(self, name: str) -> None:
        self.name = name

    def copy_in(self, request: CopyRequest, context: ToolContext) -> Deferred[CopyResult]:
        return Deferred.fromCoroutine(self._get(request, context))

    def copy_out(self, request: CopyRequest, context: ToolContext) -> Deferred[CopyResult]:
        return Deferred.fromCoroutine(self._put(request, context))

    def _headers(
        self, method: str, url: str, request: CopyRequest, context: ToolContext, extra: dict[str, str]
    ) -> Headers:
        keys = context.credentials.s3_keys(request.settings)
        now = datetime.datetime.fromtimestamp(context.clock.seconds(), datetime.UTC)
        region = str(request.settings.get("region", "us-east-1"))
        signed = sign_v4(method, url, extra, keys, region=region, now=now)
        return Headers({k.encode(): [v.encode()] for k, v in signed.items()})

    async def _get(self, request: CopyRequest, context: ToolContext) -> CopyResult:
        assert context.http is not None, "S3 needs an HTTP client"
        url = http_url(request.remote, request.settings)
        response = await context.http.get(url, headers=self._headers("GET", url, request, context, {}))
        return await receive_download(response, request, self._error, context.in_thread)

    async def _put(self, request: CopyRequest, context: ToolContext) -> CopyResult:
        assert context.http is not None, "S3 needs an HTTP client"
        url = http_url(request.remote, request.settings)
        facts = await context.in_thread(file_facts, request.local, md5=True)
        if facts.size > MAX_SINGLE_PUT:
            raise TransferError(
                ErrorCode.STAGEOUTFAILED, f"{request.lfn}: larger than 5 GiB (single-part upload only)"
            )
        assert facts.md5 is not None
        content_md5 = base64.b64encode(bytes.fromhex(facts.md5)).decode()
        extra = {"content-md5": content_md5, "content-length": str(facts.size)}
        headers = self._headers("PUT", url, request, context, extra)
        handle = request.local.open("rb")
        reader = CountingReader(handle, request.progress)
        try:
            producer = FileBodyProducer(reader)  # type: ignore[no-untyped-call]
            response = await context.http.put(url, data=producer, headers=headers)
            body = await body_snippet(response)
        finally:
            handle.close()
        if response.code not in (200, 201):
            raise self._error(response.code, body, request)
        etag = (response.headers.getRawHeaders(b"etag") or [b""])[0].decode().strip('"')
        if etag and etag != facts.md5:
            raise TransferError(
                ErrorCode.PUTMD5MISMATCH, f"{request.lfn}: stored ETag {etag} != local md5 {facts.md5}"
            )
        return CopyResult(
            remote_checksum=request.checksum, remote_url=request.remote, verified_remotely=etag == facts.md5
        )

    def _error(self, status: int, body: str, request: CopyRequest) -> TransferError:
        stage_in = request.stage_in
        if status == 404:
            if stage_in:
                return TransferError(
                    ErrorCode.MISSINGINPUTFILE, f"{request.remote}: 404 not found", missing=True
                )
            return TransferError(ErrorCode.STAGEOUTFAILED, f"{request.remote}: 404 (no such bucket?) {body}")
        if status in (401, 403):
            code = (
                ErrorCode.STAGEINAUTHENTICATIONFAILURE
                if stage_in
                else ErrorCode.STAGEOUTAUTHENTICATIONFAILURE
            )
            return TransferError(code, f"{request.remote}: HTTP {status} {body}")
        if status == 400 and "BadDigest" in body:
            return TransferError(ErrorCode.PUTMD5MISMATCH, f"{request.remote}: the store saw a different MD5")
        code = ErrorCode.STAGEINFAILED if stage_in else ErrorCode.STAGEOUTFAILED
        return TransferError(code, f"{request.remote}: HTTP {status} {body}")


s3 = S3Tool("s3")
objectstore = S3Tool("objectstore")
