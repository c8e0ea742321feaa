"""What a container runtime is asked to run, and what it hands back.

The pilot describes one process (payload, pre/co/post-process, utility, copytool) as
a ``ContainerSpec``; a runtime (``IContainerRuntime``) turns it into the argument vector
and environment of the launcher process (``bwrap ...``, ``apptainer exec ...``) that
the process runner starts.  Everything is an argument vector: nothing from the job
definition is ever interpolated into a pilot-side shell command.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import field
from pathlib import Path

from pilot.util.records import record

#: Host trees a host-based runtime (bubblewrap) shows read-only; paths in them need no bind.
SYSTEM_TREES = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt", "/cvmfs")

#: The process roles a queue's ``container_type`` can assign runtimes to.
ROLES = ("payload", "preprocess", "coprocess", "postprocess", "utility", "stagein", "stageout")


class ImageError(ValueError):
    """The container image is missing, unusable or not wanted by the runtime (IMAGENOTFOUND)."""


@record(frozen=True)
class Bind:
    """A host path made visible inside the container."""

    source: Path
    destination: Path
    read_only: bool = True


@record(frozen=True)
class ContainerSpec:
    """One process to run in a container."""

    role: str
    argv: Sequence[str]  # the process as it would run without a container
    env: Mapping[str, str]  # its complete environment (already filtered by the pilot)
    workdir: Path  # bound read-write; the process's home and working directory
    image: str | None = None  # container image (apptainer/singularity); None for bubblewrap
    options: str = ""  # the queue's container_options (runtime-specific, split with shlex)
    binds: Sequence[Bind] = ()  # extra binds (e.g. /cvmfs, a direct-access cache)
    network: bool = True  # False: a private network namespace (no network)
    hidden: Sequence[Path] = ()  # host paths that must not be visible (pilot dir, proxy, tokens)


@record(frozen=True)
class Launch:
    """How to start the containerised process: the launcher's argv and environment."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    #: Launcher processes above the contained process (bwrap and its namespace init):
    #: a soft stop (SIGTERM) goes to the processes below them only.
    shield_levels: int = 0
