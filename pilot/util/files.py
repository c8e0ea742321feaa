"""Writing files that other programs read while the pilot rewrites them, and who may read them.

Everything the pilot writes (its logs, job summaries, payload output, the job
directories) says something about the jobs and may hold what a payload printed, so it is
owner-only unless the site says otherwise: ``FileModes`` is that one site choice
(``--file-mode private|group``), applied as the process umask at start-up and as the
explicit mode of the places that set one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pilot.util.records import record


@record(frozen=True)
class FileModes:
    """The permissions of what the pilot creates."""

    name: str
    file: int
    directory: int
    executable: int
    #: For the pilot process, so that files created without an explicit mode (copytool
    #: logs, downloads, tarballs, payload outputs: children inherit it) follow suit.
    umask: int


#: Owner only: the default.
PRIVATE = FileModes("private", file=0o600, directory=0o700, executable=0o700, umask=0o077)
#: Readable by the pilot's group too: for sites whose monitoring reads job directories
#: and logs under another uid of the pilot's group.
GROUP = FileModes("group", file=0o640, directory=0o750, executable=0o750, umask=0o027)
FILE_MODES: dict[str, FileModes] = {modes.name: modes for modes in (PRIVATE, GROUP)}


def write_bytes_atomically(path: Path, data: bytes, *, durable: bool = True, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that readers see the old file or the new one, never half.

    The temporary file is unique (several writers cannot clobber each other's) and in the
    same directory (``os.replace`` is atomic only within one file system).  ``durable``
    syncs it before the rename, so that a crash cannot leave an empty file under the final
    name; files rewritten every few seconds and worthless after a crash skip that.  The
    file gets ``mode`` before it appears under its name (owner-only by default: see
    ``FileModes``), whatever the umask.
    """
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
            os.fchmod(handle.fileno(), mode)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise


def write_text_atomically(path: Path, text: str, *, durable: bool = True, mode: int = 0o600) -> None:
    """``write_bytes_atomically`` of ``text`` in UTF-8, line ends as given."""
    write_bytes_atomically(path, text.encode("utf-8"), durable=durable, mode=mode)


def open_for_append(path: Path, mode: int = 0o600) -> int:
    """A descriptor to append to ``path`` (close-on-exec).

    A file it creates gets exactly ``mode``, whatever the umask; an existing file keeps
    its mode (the operator's, or an earlier run's).
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
    try:
        descriptor = os.open(path, flags | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return os.open(path, flags)
    try:
        os.fchmod(descriptor, mode)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor
