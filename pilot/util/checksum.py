"""File checksums as PanDA and Rucio use them: adler32 (8 hex digits) and md5.

Files are read in 256 KiB chunks, never loaded whole; callers run these functions in a
thread (``deferToThread``), never on the reactor thread.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path

CHUNK = 256 << 10


@dataclass(frozen=True)
class FileFacts:
    """Size and checksums of a local file."""

    size: int
    adler32: str
    md5: str | None = None


def adler32_hex(value: int) -> str:
    return f"{value & 0xFFFFFFFF:08x}"


def file_facts(path: Path, *, md5: bool = False) -> FileFacts:
    """Size and adler32 (and md5 if asked) of ``path``, reading it once."""
    adler = 1
    digest = hashlib.md5(usedforsecurity=False) if md5 else None
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            adler = zlib.adler32(chunk, adler)
            size += len(chunk)
            if digest is not None:
                digest.update(chunk)
    return FileFacts(size=size, adler32=adler32_hex(adler), md5=digest.hexdigest() if digest else None)
