"""The ``twistd panda-dev`` command (loaded lazily: twistd's plug-in scan stays cheap)."""

from twisted.application.service import ServiceMaker

pandaDev = ServiceMaker(  # type: ignore[no-untyped-call]
    "PanDA development server",
    "pilot.devserver.tap",
    "An embedded PanDA-compatible server (both pilot APIs, HTTPS with a test PKI) for development and tests.",
    "panda-dev",
)
