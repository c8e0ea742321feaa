"""txpilot: a PanDA pilot built on Twisted."""

__version__ = "0.1.0"
