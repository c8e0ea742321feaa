"""``twistd pilot`` command line, config file merging, and start-up validation.

Option names follow the reference pilot (pilot3), and every pilot3 option name is
accepted (``pilot.options.pilot3``), so site wrapper scripts can switch pilots without
rewriting their command lines.  Every option can also be set in a TOML config file
(``--config``, section ``[pilot]``, keys are the long option names); the command line
wins over the file, the file over defaults.

A bad option, a bad config file or an unusable queuedata *file* ends the pilot
before it starts, with one line on stderr and a documented exit code
(``ExitCode.USAGE``, ``QUEUEDATA``, ``QUEUEDATANOTOK``): a batch log full of usage
text helps nobody.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import NoReturn

from twisted.python import usage

from pilot import __version__
from pilot.config import PilotConfig
from pilot.errors import ExitCode
from pilot.options.build import (
    build_config,
    detect_batch_id,
    read_config_file,
    resolve_credentials,
    server_base_url,
)
from pilot.options.pilot3 import ALIASES, INERT
from pilot.options.settings import DEFAULT_PORT, DEFAULT_URL, SETTINGS, ConfigError

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_URL",
    "ConfigError",
    "PilotOptions",
    "build_config",
    "detect_batch_id",
    "read_config_file",
    "resolve_credentials",
    "server_base_url",
]


def _fail(message: str, exit_code: ExitCode) -> NoReturn:
    sys.stderr.write(f"pilot: error: {message}\n")
    raise SystemExit(int(exit_code))


def _help(doc: str, default: object) -> str:
    shown = default not in (None, "", False)
    return doc + (
        f" [default: {str(default).lower() if isinstance(default, bool) else default}]" if shown else ""
    )


_INERT_HELP = "pilot3 option, no effect here: "


class PilotOptions(usage.Options):
    """``twistd pilot`` options; after parsing, ``self.config`` is a validated PilotConfig."""

    synopsis = "[options] -q QUEUE"
    longdesc = (
        "Ask a PanDA server for jobs for QUEUE, run them and report them, until the queue's "
        "timefloor or the pilot's lifetime is used up.  Exit codes are listed in the README.  "
        "Run it as 'twistd --pidfile= -n pilot ...': without -n, twistd daemonizes, returns 0 "
        "at once and the pilot's exit code is lost.  pilot3's option names are accepted; those "
        "that mean nothing here are named in a notice at start."
    )
    optFlags = (
        [[s.name, s.short, s.doc] for s in SETTINGS if s.is_flag]
        + [[o.name, o.short, _INERT_HELP + o.reason] for o in INERT if o.kind == "flag"]
        + [["version", None, "Print the version and exit."]]
    )
    optParameters = (
        [[s.name, s.short, None, _help(s.doc, s.default)] for s in SETTINGS if not s.is_flag]
        + [[o.name, o.short, None, _INERT_HELP + o.reason] for o in INERT if o.kind != "flag"]
        + [["config", "c", None, "TOML config file with a [pilot] table of these options."]]
    )

    config: PilotConfig

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._environ: Mapping[str, str] = os.environ if environ is None else environ

    def parseOptions(self, options: list[str] | None = None) -> None:
        try:
            super().parseOptions(options)  # type: ignore[no-untyped-call]
        except usage.UsageError as exc:
            _fail(str(exc), ExitCode.USAGE)

    def opt_version(self) -> None:
        sys.stdout.write(f"txpilot {__version__}\n")
        raise SystemExit(0)

    def postOptions(self) -> None:
        try:
            self.config = build_config(self, self._environ)
        except ConfigError as exc:
            _fail(str(exc), exc.exit_code)


def _alias(setting: str) -> Callable[[PilotOptions, str], None]:
    """An ``opt_`` handler that stores into ``setting``: in argv order, so the last one wins."""

    def store(self: PilotOptions, value: str) -> None:
        self[setting] = value

    store.__doc__ = f"pilot3's name for --{setting}."
    return store


# usage.Options finds its handlers among the class's ``opt_*`` attributes when an
# instance is made; pilot3's spellings become handlers writing the txpilot setting.
for _name, _setting in ALIASES.items():
    setattr(PilotOptions, "opt_" + _name.replace("-", "_"), _alias(_setting))
