"""The ``generic`` experiment: run the transformation with the job parameters, nothing more."""

from __future__ import annotations

from twisted.plugin import IPlugin
from zope.interface import implementer

from pilot.experiments.base import BaseExperiment
from pilot.interfaces import IExperiment


@implementer(IPlugin, IExperiment)
class GenericExperiment(BaseExperiment):
    """``<transformation> <jobPars>`` through bash, in the job's work directory."""

    name = "generic"
