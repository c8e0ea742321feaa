"""The container runtimes the pilot knows, by the name ``container_type`` uses.

Runtimes are stateless, so one instance of each serves every job; the mapping is
built on demand so that importing this module costs nothing until a queue asks for
a container.
"""

from __future__ import annotations

from pilot.container.apptainer import ApptainerRuntime
from pilot.container.bubblewrap import BubblewrapRuntime
from pilot.container.interfaces import IContainerRuntime
from pilot.container.select import RUNTIME_ALIASES


def runtimes() -> dict[str, IContainerRuntime]:
    """Every runtime by its name (``bubblewrap``, ``apptainer``)."""
    found: list[IContainerRuntime] = [BubblewrapRuntime(), ApptainerRuntime()]
    return {runtime.name: runtime for runtime in found}


def runtime_named(name: str) -> IContainerRuntime:
    """The runtime called ``name`` or one of its aliases (``bwrap``, ``singularity``).

    Raises ``KeyError`` naming the known runtimes, so a typo in a queue's
    configuration reads as one.
    """
    known = runtimes()
    canonical = RUNTIME_ALIASES.get(name.strip().lower(), name)
    try:
        return known[canonical]
    except KeyError:
        raise KeyError(
            f"unknown container runtime {name!r}; known runtimes: {', '.join(sorted(known))} "
            f"(aliases: {', '.join(sorted(set(RUNTIME_ALIASES) - set(known)))})"
        ) from None
