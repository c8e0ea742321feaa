"""Private copies of the pilot's credential files, in a directory only the pilot's uid can enter.

The site hands the pilot its proxy and token where it likes (``/tmp/x509up_u<uid>``, a
batch system's credential directory, a Harvester work directory), often where other
processes of the node can read them or where a container bind would show them.  The
pilot copies them into one directory of its own (``0700``, files ``0600``, created
where it alone writes: its pilot directory) and points its own clients and copytools
at the copies.  Then:

* one hidden path (the pilot directory) covers every credential when payloads run in a
  container, and apptainer never refuses a job because ``/tmp`` is bound while the
  proxy lives in it;
* a payload run under another uid cannot read them, even where the originals are
  group- or world-readable;
* the payload's environment never names a credential path (``X509_USER_PROXY`` of a
  payload is the job's own proxy, if any).

A payload with the pilot's uid and no container can still read any file the pilot can:
file modes do not separate processes of one uid (``docs/security.md``).

Grid proxies are renewed in place; ``PrivateCredentials.refresh`` copies a source again
when its identity, size or modification time changed, atomically (a reader sees the old
copy or the new one).  Everything here blocks: call it in a worker thread or before the
reactor runs.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path

from pilot.util.files import write_bytes_atomically

#: Sub-directory of the pilot directory holding the copies.
CREDENTIALS_DIR = ".credentials"


class PrivateAreaError(Exception):
    """The private directory is not private (another owner, a link, not a directory)."""


def private_directory(path: Path) -> Path:
    """``path`` as a directory that only the pilot's uid may enter: created 0700 or checked.

    An existing directory must be ours and not a symbolic link; group or world access to
    it is removed.
    """
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise PrivateAreaError(f"{path} is not a directory")
    if info.st_uid != os.geteuid():
        raise PrivateAreaError(f"{path} belongs to uid {info.st_uid}, not to the pilot ({os.geteuid()})")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def _identity(path: Path) -> tuple[int, int, int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


class PrivateCredentials:
    """Copies of credential files (name → source path) kept in a private directory."""

    def __init__(self, directory: Path, sources: Mapping[str, Path]) -> None:
        for name in sources:
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"not a plain file name: {name!r}")
        self.directory = directory
        self.sources = dict(sources)
        self._copied: dict[str, tuple[int, int, int, int]] = {}

    @property
    def paths(self) -> dict[str, Path]:
        """Where each copy is (whether made yet or not)."""
        return {name: self.directory / name for name in self.sources}

    def refresh(self) -> list[str]:
        """Copy each source that is new or changed since its last copy; the names copied.

        Raises OSError when a source cannot be read (at start-up: the credential is
        missing; later: keep using the last copy, it may still be valid) and
        PrivateAreaError when the directory is not private.
        """
        private_directory(self.directory)
        copied = []
        for name, source in self.sources.items():
            before = _identity(source)
            if self._copied.get(name) == before:
                continue
            data = source.read_bytes()
            write_bytes_atomically(self.directory / name, data, durable=False, mode=0o600)
            # a renewal during the read is seen (and copied) at the next refresh
            self._copied[name] = before
            copied.append(name)
        return copied

    def remove(self) -> None:
        """Delete the copies (at the pilot's end)."""
        shutil.rmtree(self.directory, ignore_errors=True)
