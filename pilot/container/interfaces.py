"""The contract of a container runtime (bubblewrap, apptainer, or a plug-in's own)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from pilot.container.spec import ContainerSpec, Launch


class IContainerRuntime(Interface):
    """A way of running one process in a container (``pilot.container``)."""

    name = Attribute("The runtime's name as used in container_type (str).")

    def available(environ: Mapping[str, str]) -> bool:
        """Whether the runtime's executable is installed (on ``environ``'s PATH)."""

    def wrap(spec: ContainerSpec, environ: Mapping[str, str]) -> Launch:
        """The launcher argv and environment that run ``spec`` in a container.

        ``environ`` is the pilot's environment (to find executables).  Secrets in
        ``spec.env`` must never end up on the launcher's command line.  Raises
        ``FileNotFoundError`` when the runtime is not installed, ``ImageError`` (a
        ``ValueError``) for an image problem and ``ValueError`` for anything else it
        cannot honour.
        """
