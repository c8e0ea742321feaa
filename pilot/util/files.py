"""Writing files that other programs read while the pilot rewrites them."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_text_atomically(path: Path, text: str, *, durable: bool = True) -> None:
    """Replace ``path`` with ``text`` so that readers see the old file or the new one, never half.

    The temporary file is unique (several writers cannot clobber each other's) and in the
    same directory (``os.replace`` is atomic only within one file system).  ``durable``
    syncs it before the rename, so that a crash cannot leave an empty file under the final
    name; files rewritten every few seconds and worthless after a crash skip that.
    """
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide the file from site tools
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
