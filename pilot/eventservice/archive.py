"""Archives of range outputs: one tar per batch, measured while it is written.

A payload names each range's output by path, so the path is checked before a byte of
it is read: it must be a regular file inside the job's work directory once every
symbolic link is resolved (a payload must not make the pilot ship ``/etc/shadow`` or
the pilot's proxy to the object store).  An output that fails the check fails its
range, not the batch.

The tar is written in one pass, and its size and adler32 come from the bytes as they
are written, so the archive is never read back to be measured.  Members are stored
uncompressed (the outputs are ROOT files, already compressed) under their base names.
This runs in the pilot's thread pool: it is blocking file work.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from pilot.util.checksum import FileFacts, RunningChecksum
from pilot.util.records import record

#: The prefix of an archive's name (``EventService_premerge_<first range id>.tar``).
ARCHIVE_PREFIX = "EventService_premerge_"


class OutputRefused(ValueError):
    """A range's output that cannot go into an archive (the text says why)."""


@record(frozen=True)
class ArchiveMember:
    range_id: str
    path: Path


@record(frozen=True)
class BuiltArchive:
    """The archive on local disk; ``members`` went in, ``refused`` (range id → why) did not."""

    path: Path
    facts: FileFacts
    members: tuple[str, ...]
    refused: dict[str, str]
    #: The outputs that went in, by their real paths.
    files: tuple[Path, ...] = ()


def archive_name(first_range_id: str) -> str:
    """The archive's LFN: the established prefix and the batch's first range id, made name-safe."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in first_range_id)
    return f"{ARCHIVE_PREFIX}{safe}.tar"[:250]


def checked_output(path_text: str, workdir: Path) -> Path:
    """The output's real path, if it is a regular file inside ``workdir``; else OutputRefused."""
    path = Path(path_text)
    if not path.is_absolute():
        path = workdir / path
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise OutputRefused(f"output {path_text!r} cannot be read: {exc}") from None
    root = workdir.resolve()
    if real != root and root not in real.parents:
        raise OutputRefused(f"output {path_text!r} is outside the job's work directory")
    mode = os.stat(real).st_mode
    if not stat.S_ISREG(mode):
        raise OutputRefused(f"output {path_text!r} is not a regular file")
    return real


class _MeasuringWriter:
    """A file object that measures what goes through it (size, adler32) on its way to disk."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.checksum = RunningChecksum()

    def write(self, data: bytes) -> int:
        self.checksum.update(data)
        return self._raw.write(data)

    def flush(self) -> None:
        self._raw.flush()


def build_archive(members: Sequence[ArchiveMember], workdir: Path, destination: Path) -> BuiltArchive:
    """Write ``destination`` (a tar of the members' outputs that pass ``checked_output``)."""
    refused: dict[str, str] = {}
    accepted: list[tuple[str, Path]] = []
    names: set[str] = set()
    for member in members:
        try:
            real = checked_output(str(member.path), workdir)
        except OutputRefused as exc:
            refused[member.range_id] = str(exc)
            continue
        if real.name in names:
            refused[member.range_id] = f"output {real.name!r} is also another range's output"
            continue
        names.add(real.name)
        accepted.append((member.range_id, real))
    partial = destination.with_name(destination.name + ".part")
    with partial.open("wb") as raw:
        writer = _MeasuringWriter(raw)
        with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            stored: list[tuple[str, Path]] = []
            for range_id, real in accepted:
                try:
                    handle = _open_regular(real)
                except OutputRefused as exc:
                    refused[range_id] = str(exc)
                    continue
                with handle:
                    info = tar.gettarinfo(arcname=real.name, fileobj=handle)
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, handle)
                stored.append((range_id, real))
        raw.flush()
        os.fsync(raw.fileno())
    partial.replace(destination)
    return BuiltArchive(
        path=destination,
        facts=writer.checksum.facts(),
        members=tuple(range_id for range_id, _ in stored),
        refused=refused,
        files=tuple(real for _, real in stored),
    )


def _open_regular(real: Path) -> BinaryIO:
    """Open an output that passed ``checked_output``, refusing what was swapped in since.

    Between the check and the read a payload could replace the file with a symbolic
    link (``O_NOFOLLOW`` refuses it) or a FIFO (``O_NONBLOCK`` keeps the open from
    blocking a pool thread, and ``fstat`` refuses anything but a regular file).
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(real, flags)
    except OSError as exc:
        raise OutputRefused(f"output {str(real)!r} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputRefused(f"output {str(real)!r} is not a regular file")
    return os.fdopen(fd, "rb")
