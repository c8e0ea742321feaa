"""File checksums as PanDA and Rucio use them: adler32 (8 hex digits) and md5.

Files are read in 1 MiB chunks, never loaded whole; callers run these functions in a
thread (``deferToThread``), never on the reactor thread.  adler32 of large chunks comes
from zlib-ng when it is installed (SIMD, ~40 GB/s against ~2.5 GB/s for zlib: the checksum
of a 1 GiB input costs 25 ms instead of 400 ms of a worker-node core), imported with the
first such chunk; small files (logs, catalogues) need only the standard library's.
"""

from __future__ import annotations

import functools
import hashlib
import zlib
from collections.abc import Callable
from pathlib import Path

from pilot.util.records import record

CHUNK = 1 << 20

#: Chunks at least this large go to zlib-ng's adler32 (both give the same value).
FAST_FROM = 256 << 10


@functools.cache
def fast_adler32() -> Callable[[bytes | memoryview, int], int]:
    """zlib-ng's adler32, else the standard library's."""
    try:
        from zlib_ng.zlib_ng import adler32
    except ImportError:  # pragma: no cover - zlib-ng is a declared dependency
        return zlib.adler32
    return adler32


def adler32(chunk: bytes | memoryview, value: int = 1) -> int:
    """adler32 of ``chunk`` continuing ``value``, by the faster implementation for its size."""
    if len(chunk) >= FAST_FROM:
        return fast_adler32()(chunk, value)
    return zlib.adler32(chunk, value)


@record(frozen=True)
class FileFacts:
    """Size and checksums of a local file."""

    size: int
    adler32: str
    md5: str | None = None


def adler32_hex(value: int) -> str:
    return f"{value & 0xFFFFFFFF:08x}"


class RunningChecksum:
    """adler32 (and md5 if asked) of bytes fed in order, as a file is read or written."""

    def __init__(self, *, md5: bool = False) -> None:
        self.size = 0
        self._adler = 1
        self._md5 = hashlib.md5(usedforsecurity=False) if md5 else None

    def update(self, chunk: bytes | memoryview) -> None:
        self._adler = adler32(chunk, self._adler)
        self.size += len(chunk)
        if self._md5 is not None:
            self._md5.update(chunk)

    def facts(self) -> FileFacts:
        md5 = self._md5.hexdigest() if self._md5 is not None else None
        return FileFacts(size=self.size, adler32=adler32_hex(self._adler), md5=md5)


def file_facts(path: Path, *, md5: bool = False) -> FileFacts:
    """Size and adler32 (and md5 if asked) of ``path``, reading it once."""
    running = RunningChecksum(md5=md5)
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            running.update(chunk)
    return running.facts()
