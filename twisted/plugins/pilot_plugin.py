"""The ``twistd pilot`` command (loaded lazily: twistd's plug-in scan stays cheap)."""

from twisted.application.service import ServiceMaker

pilot = ServiceMaker(  # type: ignore[no-untyped-call]
    "PanDA pilot",
    "pilot.tap",
    "Fetch, run, monitor and report PanDA jobs on this worker node.",
    "pilot",
)
