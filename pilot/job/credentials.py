"""Credentials a job brings for its payload: written per job, mode 0600, never on a command line.

The pilot's own proxy and tokens never reach a payload.  What a job itself carries —
``secrets`` (a JSON object of the user's secrets, as PanDA delivers them) and
``userProxy`` (the user's proxy, PEM) — is written into ``<workdir>/.pilot-secrets/``
(directory 0700, files 0600) and announced by path in the environment
(``PANDA_JOB_SECRETS_FILE``, ``X509_USER_PROXY``).  The directory is removed as soon as
the job's processes have ended and is never part of the log tarball.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pilot.model.job import Job

SECRETS_DIR = ".pilot-secrets"


def _write_private(path: Path, data: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(data)


def write_job_credentials(job: Job, workdir: Path) -> dict[str, str]:
    """Write the job's own credentials; the environment variables that point at them."""
    proxy = job.raw.get("userProxy")
    env: dict[str, str] = {}
    if not job.secrets and not proxy:
        return env
    directory = workdir / SECRETS_DIR
    directory.mkdir(mode=0o700, exist_ok=True)
    if job.secrets:  # checked by parse_job: an object of strings
        target = directory / "job_secrets.json"
        _write_private(target, json.dumps(dict(job.secrets)))
        env["PANDA_JOB_SECRETS_FILE"] = str(target)
    if proxy and str(proxy).upper() != "NULL":
        target = directory / "x509_user_proxy"
        _write_private(target, str(proxy))
        env["X509_USER_PROXY"] = str(target)
    return env


def remove_job_credentials(workdir: Path) -> None:
    shutil.rmtree(workdir / SECRETS_DIR, ignore_errors=True)
