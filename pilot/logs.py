"""Structured logging: one level switch for the pilot's events, and the JSON log file.

All pilot modules log through ``twisted.logger.Logger`` objects whose observer is
``pilot_observer``: a level filter in front of the global log publisher.  twistd
prints whatever reaches the global publisher on the console, so this filter is what
keeps debug events off the console unless ``--debug`` is given.  The JSON log file
(RFC 7464 records, one per event, readable with ``eventsFromJSONLogFile``) is an
additional observer on the global publisher.

Event field names are a schema: ``event`` (a dotted event type such as
``job.phase``), ``pandaid``, ``state``... keep them stable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
    jsonFileLogObserver,
)

from pilot.util.files import open_for_append

_levels = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)

#: Observer for every pilot Logger: drops events below the configured level.
pilot_observer: ILogObserver = FilteringLogObserver(globalLogPublisher, [_levels])


def set_debug(debug: bool) -> None:
    """Let debug events through (``--debug``) or not."""
    _levels.setLogLevelForNamespace("", LogLevel.debug if debug else LogLevel.info)


class JsonLogFile:
    """The pilot's JSON log file, attached to the global log publisher while open.

    A new file is created with ``mode`` (owner-only by default: the log names jobs,
    files, hosts and diagnostics that other users of the node have no business reading);
    an existing file, which the operator made, keeps its mode.
    """

    def __init__(self, path: Path, mode: int = 0o600) -> None:
        self.path = path
        self.mode = mode
        self._handle: IO[str] | None = None
        self._observer: ILogObserver | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = os.fdopen(open_for_append(self.path, self.mode), "a", encoding="utf-8")
        self._observer = jsonFileLogObserver(self._handle)
        globalLogPublisher.addObserver(self._observer)

    def close(self) -> None:
        if self._observer is not None:
            globalLogPublisher.removeObserver(self._observer)
            self._observer = None
        if self._handle is not None:
            self._handle.close()
            self._handle = None
