"""The pilot as a twistd service tree (``PilotService``), built by ``pilot.tap``."""

from pilot.service.pilot import HANDLED_SIGNALS, PilotService

__all__ = ["HANDLED_SIGNALS", "PilotService"]
