"""Who runs in which container: the queue's ``container_type`` and the job's image.

CRIC writes ``container_type`` as ``runtime:role;runtime:role`` (pilot3's queues say
``singularity:pilot;docker:wrapper``).  Roles are ours (``pilot.container.spec.ROLES``)
plus CRIC's words: ``pilot``/``wrapper`` mean the payload, ``middleware`` means
stage-in and stage-out, ``all`` every role.  Runtime names: ``bubblewrap`` (``bwrap``),
``apptainer`` (``singularity``).  Unknown words are ignored rather than fatal: a queue
description written for another pilot must not stop this one.
"""

from __future__ import annotations

import re

from pilot.container.spec import ROLES
from pilot.model.job import Job
from pilot.queuedata import QueueData

RUNTIME_ALIASES = {
    "bubblewrap": "bubblewrap",
    "bwrap": "bubblewrap",
    "apptainer": "apptainer",
    "singularity": "apptainer",
}
ROLE_ALIASES: dict[str, tuple[str, ...]] = {
    "pilot": ("payload",),
    "wrapper": ("payload",),
    "payload": ("payload",),
    "middleware": ("stagein", "stageout"),
    "all": ROLES,
    **{role: (role,) for role in ROLES},
}


def parse_container_type(text: str) -> dict[str, str]:
    """``container_type`` → {role: runtime}."""
    mapping: dict[str, str] = {}
    for item in re.split(r"[;,]", text or ""):
        runtime, _, role = item.strip().partition(":")
        runtime_name = RUNTIME_ALIASES.get(runtime.strip().lower())
        roles = ROLE_ALIASES.get(role.strip().lower() or "payload")
        if runtime_name is None or roles is None:
            continue
        for name in roles:
            mapping[name] = runtime_name
    return mapping


def job_image(job: Job) -> str | None:
    """``--containerImage <image>`` in the job parameters, else the job's ``container_name``.

    Found and checked once, when the job was parsed (``Job.container_image``): the
    parameters may be 120 kB of shell text, and this is asked for every process.
    """
    return job.container_image


def runtime_for(role: str, job: Job, queuedata: QueueData) -> str | None:
    """The runtime for ``role``: the queue's mapping; an image-only job on a queue that
    maps nothing runs its payload in apptainer."""
    mapping = parse_container_type(queuedata.container_type)
    if role in mapping:
        return mapping[role]
    if role == "payload" and job_image(job) is not None and not mapping:
        return "apptainer"
    return None
