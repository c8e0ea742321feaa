"""The payload's environment: built explicitly, never inherited wholesale.

A pilot's own environment holds its credentials (``X509_USER_PROXY``, OIDC token
paths, cloud keys).  A payload must not see them unless the job asks for them, so
the payload environment is assembled from:

1. an allow-list of variables from the pilot's environment that payloads
   legitimately need (locale, ``PATH``, HTTP proxies for Frontier/CVMFS, the grid CA
   directory, batch-system slot information), minus anything whose name looks like a
   credential;
2. the queue's ``environ`` setting;
3. job variables: ``PandaID``, ``PanDA_TaskID``, ``PanDA_AttemptNr``, ``TZ=UTC``,
   ``ATHENA_PROC_NUMBER``/``ATHENA_CORE_NUMBER`` from the core count.

Experiment plug-ins can add to it (see ``pilot.interfaces``).

Every process of a job (not only the payload) also carries the job's marker,
``TXPILOT_JOB_MARKER=<PandaID>-<attempt>-<random>`` (``job_marker``), added by the job's
launcher: whatever those processes start inherits it, so that the final sweep after
the job (``pilot.process.sweep``) finds what escaped the job's process groups.  The
random part makes it unguessable, so only a process started with the job's own
environment can carry it.

Copytools act for the pilot and get its proxy and token, preferably by the paths of the
pilot's private copies (``pilot.util.private``) rather than the site's originals.
"""

from __future__ import annotations

import fnmatch
import functools
import re
import secrets
from collections.abc import Mapping
from pathlib import Path

from pilot.model.job import Job
from pilot.util.secrets import CREDENTIAL_VARIABLES, name_matches

#: Variables passed through from the pilot's environment (exact names or globs).
ALLOWED: tuple[str, ...] = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "HOSTNAME",
    "LANG",
    "LANGUAGE",
    "LC_*",
    "TERM",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "FRONTIER_SERVER",
    "X509_CERT_DIR",
    "X509_VOMS_DIR",
    "VO_*",
    "SITE_NAME",
    "ATLAS_LOCAL_ROOT_BASE",
    "ALRB_*",
    "CVMFS_*",
    "OSG_*",
    "GLIDEIN_Site",
    "SLURM_JOB_ID",
    "SLURM_CPUS_ON_NODE",
    "SLURM_JOB_END_TIME",
    "_CONDOR_SCRATCH_DIR",
    "OMP_NUM_THREADS",
)

#: Names that are never passed through, whatever the allow-list says.
DENIED: tuple[str, ...] = (
    "X509_USER_PROXY",
    "X509_USER_CERT",
    "X509_USER_KEY",
    "*TOKEN*",
    "*SECRET*",
    "*PASSWORD*",
    "*PASSWD*",
    "*CREDENTIAL*",
    "*_KEY",
    "*_KEY_ID",
    "PANDA_AUTH_*",
    "OIDC_*",
    "BEARER_*",
)


#: The variable every process of a job carries (see the module docstring).
JOB_MARKER_VARIABLE = "TXPILOT_JOB_MARKER"


def job_marker(panda_id: int, attempt: int | None) -> str:
    """A new marker value for one run of a job: its PandaID, attempt and 64 random bits."""
    return f"{panda_id}-{attempt if attempt is not None else 0}-{secrets.token_hex(8)}"


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return _globs(patterns).fullmatch(name) is not None


@functools.lru_cache(maxsize=16)
def _globs(patterns: tuple[str, ...]) -> re.Pattern[str]:
    """One compiled pattern for a set of case-sensitive globs."""
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns) or "(?!)")


def is_denied(name: str) -> bool:
    """Whether ``name`` looks like a credential or says where one is (case-insensitive).

    ``DENIED`` and the variables the pilot removes from its own environment
    (``pilot.util.secrets.CREDENTIAL_VARIABLES``): one list could drift from the other.
    """
    return name_matches(name, DENIED) or name_matches(name, CREDENTIAL_VARIABLES)


#: What copytool processes (xrdcp, gfal-copy, rucio, lsm-*) get from the pilot's
#: environment.  Unlike payloads they act for the pilot, so the proxy and the
#: grid settings are passed; object-store keys are not (S3/GCS run in-process).
COPYTOOL_ALLOWED: tuple[str, ...] = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_*",
    "TMPDIR",
    "LD_LIBRARY_PATH",
    "X509_USER_PROXY",
    "X509_CERT_DIR",
    "X509_VOMS_DIR",
    "XRD_*",
    "GFAL_*",
    "DAVIX_*",
    "RUCIO_*",
    "BEARER_TOKEN_FILE",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
)


def copytool_environment(
    pilot_environ: Mapping[str, str], *, proxy: Path | None = None, token_file: Path | None = None
) -> dict[str, str]:
    """The environment for copytool processes (see ``COPYTOOL_ALLOWED``).

    ``proxy`` and ``token_file``: the pilot's private copies, named instead of whatever
    ``X509_USER_PROXY`` and ``BEARER_TOKEN_FILE`` said in the pilot's environment.
    """
    env = {name: value for name, value in pilot_environ.items() if _matches(name, COPYTOOL_ALLOWED)}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.setdefault("LC_ALL", "C")
    if proxy is not None:
        env["X509_USER_PROXY"] = str(proxy)
    if token_file is not None:
        env["BEARER_TOKEN_FILE"] = str(token_file)
    return env


def payload_environment(
    job: Job,
    workdir: Path,
    pilot_environ: Mapping[str, str],
    queue_environ: Mapping[str, str] = {},
) -> dict[str, str]:
    """The complete environment for ``job``'s payload."""
    env = {
        name: value
        for name, value in pilot_environ.items()
        if _matches(name, ALLOWED) and not is_denied(name)
    }
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update({k: v for k, v in queue_environ.items() if not is_denied(k)})
    env.update(
        {
            "PandaID": str(job.panda_id),
            "PanDA_TaskID": str(job.task_id) if job.task_id is not None else "",
            "PanDA_AttemptNr": str(job.attempt_nr) if job.attempt_nr is not None else "",
            "TZ": "UTC",
            "PILOT_JOB_WORKDIR": str(workdir),
            "TMPDIR": str(workdir / "tmp"),
        }
    )
    if job.core_count > 1:
        env["ATHENA_PROC_NUMBER"] = str(job.core_count)
        env["ATHENA_CORE_NUMBER"] = str(job.core_count)
    return env
