"""Drop-in that registers the experiment plug-ins shipped with txpilot."""

from pilot.experiments.generic import GenericExperiment

generic = GenericExperiment()
