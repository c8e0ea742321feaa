"""Credentials for object stores: S3 access/secret keys and GCS bearer tokens.

Looked up when a transfer needs them — never passed on a command line, never
logged, never put in a job report.  S3 keys come from a JSON file named by the
protocol's ``settings`` (``credentials_file``) or ``S3_CREDENTIALS_FILE``, or from
the environment variables the settings name (default ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``).  GCS tokens come from ``settings["token_file"]``,
``GCS_TOKEN_FILE`` or ``GCS_ACCESS_TOKEN``; a signed URL needs none.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Any

from pilot.errorcodes import ErrorCode
from pilot.staging.transfer import TransferError
from pilot.util.records import record
from pilot.util.secrets import SecretValues


@record(frozen=True)
class S3Keys:
    access_key: str
    secret_key: str = field(repr=False)


def _read_json(path: str) -> Mapping[str, Any]:
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TransferError(
            ErrorCode.MISSINGCREDENTIALS, f"cannot read credentials file {path}: {exc}"
        ) from None
    if not isinstance(document, Mapping):
        raise TransferError(ErrorCode.MISSINGCREDENTIALS, f"credentials file {path} is not a JSON object")
    return document


class Credentials:
    """Object-store credentials from the pilot's environment and protocol settings."""

    def __init__(self, environ: Mapping[str, str], *, secrets: SecretValues | None = None) -> None:
        self._environ = dict(environ)
        #: Every key or token read is added here, so that it is redacted wherever it shows.
        self.secrets = secrets

    def s3_keys(self, settings: Mapping[str, Any]) -> S3Keys:
        path = settings.get("credentials_file") or self._environ.get("S3_CREDENTIALS_FILE")
        if path:
            document = _read_json(str(path))
            access, secret = document.get("access_key"), document.get("secret_key")
        else:
            access = self._environ.get(str(settings.get("access_key_env", "AWS_ACCESS_KEY_ID")))
            secret = self._environ.get(str(settings.get("secret_key_env", "AWS_SECRET_ACCESS_KEY")))
        if not isinstance(access, str) or not isinstance(secret, str) or not access or not secret:
            raise TransferError(
                ErrorCode.MISSINGCREDENTIALS, "no S3 access/secret key available", retry_elsewhere=False
            )
        if self.secrets is not None:
            self.secrets.add(secret)
        return S3Keys(access, secret)

    def gcs_token(self, settings: Mapping[str, Any]) -> str | None:
        path = settings.get("token_file") or self._environ.get("GCS_TOKEN_FILE")
        if path:
            try:
                token: str | None = Path(str(path)).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise TransferError(
                    ErrorCode.MISSINGCREDENTIALS, f"cannot read GCS token file: {exc.strerror}"
                ) from None
        else:
            token = self._environ.get("GCS_ACCESS_TOKEN") or None
        if token and self.secrets is not None:
            self.secrets.add(token)
        return token
