"""Experiment plug-ins shipped with the pilot, and their discovery."""

from __future__ import annotations

from twisted.plugin import getPlugins

from pilot.interfaces import IExperiment


class UnknownExperiment(Exception):
    """``--pilot-user`` names no installed plug-in; the message lists the installed ones."""


def installed_experiments() -> dict[str, IExperiment]:
    """Every installed experiment plug-in, by name."""
    import twisted.plugins

    return {plugin.name: plugin for plugin in getPlugins(IExperiment, twisted.plugins)}


def find_experiment(name: str) -> IExperiment:
    plugins = installed_experiments()
    if name not in plugins:
        installed = ", ".join(sorted(plugins)) or "none"
        raise UnknownExperiment(
            f"--pilot-user: no experiment plug-in named {name!r} (installed: {installed})"
        )
    return plugins[name]
