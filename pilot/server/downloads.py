"""A pilot-wide cache of downloaded documents, so that several jobs fetch a transformation once.

A multi-job pilot runs many jobs of one task, which name the same transformation
(``https://.../runGen-00-00-02``): without a cache every job downloads it again.
``DownloadCache.fetch`` keeps one copy per URL for the pilot's life:

* a copy younger than ``max_age`` (600 s) is used as it is;
* an older one is revalidated with ``If-None-Match``/``If-Modified-Since`` (a 304
  costs one small request); if the server cannot be reached then, the copy is used
  and a warning logged;
* with an expected ``checksum`` (``ad:0a1b2c3d``, ``md5:<32 hex>``, or bare hex) a
  copy with that checksum is used whatever its URL or age (the checksum names the
  content), and a download is verified against it (``ChecksumMismatch``);
* fetches of one URL at the same time share one download; a fetcher that is
  cancelled leaves the others waiting, and the download stops when none is left.

Each job gets its own copy of the file (``destination``): a payload that rewrites its
transformation must not change what the next job runs, which a hard link would allow.
Copies are small (the limit is 64 MiB) and made in a worker thread.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from pilot.logs import pilot_observer
from pilot.server.body import DOCUMENT_LIMIT
from pilot.server.client import PandaClient
from pilot.server.errors import ChecksumMismatch, LocalFileError, ServerError
from pilot.util.checksum import FileFacts
from pilot.util.records import record
from pilot.util.threads import ThreadRunner

log = Logger(observer=pilot_observer)

#: Seconds a cached copy is used without asking the server whether it changed.
MAX_AGE = 600.0

_CHECKSUM = re.compile(r"(?:(?P<kind>ad|adler32|md5):)?(?P<value>[0-9a-fA-F]{8}|[0-9a-fA-F]{32})")


@record(frozen=True)
class Checksum:
    """An expected checksum: ``kind`` is ``adler32`` or ``md5``, ``value`` lower-case hex."""

    kind: str
    value: str

    @classmethod
    def parse(cls, text: str) -> Checksum:
        """``ad:0a1b2c3d``/``adler32:...``/``md5:...`` or bare hex (8 digits adler32, 32 md5)."""
        match = _CHECKSUM.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"not a checksum: {text!r}")
        value = match["value"].lower()
        kind = {"ad": "adler32", None: "adler32" if len(value) == 8 else "md5"}.get(
            match["kind"], match["kind"]
        )
        if (kind == "adler32") != (len(value) == 8):
            raise ValueError(f"not a {kind} checksum: {text!r}")
        return cls(kind, value)

    def matches(self, facts: FileFacts) -> bool:
        return (facts.adler32 if self.kind == "adler32" else facts.md5) == self.value

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


@record
class _Entry:
    path: Path
    facts: FileFacts
    etag: str | None
    last_modified: str | None
    checked: float


class _Shared:
    """One download awaited by several fetchers, each with its own Deferred."""

    def __init__(self, work: Deferred[_Entry]) -> None:
        self._work = work
        self._waiters: list[Deferred[_Entry]] = []
        self._result: _Entry | Failure | None = None
        work.addBoth(self._done)

    def wait(self) -> Deferred[_Entry]:
        if isinstance(self._result, Failure):
            return fail(self._result)
        if self._result is not None:  # the work finished at once (everything was at hand)
            return succeed(self._result)
        waiter: Deferred[_Entry] = Deferred(self._leave)
        self._waiters.append(waiter)
        return waiter

    def _leave(self, waiter: Deferred[_Entry]) -> None:
        self._waiters.remove(waiter)
        if not self._waiters:
            self._work.cancel()

    def _done(self, result: _Entry | Failure) -> None:
        self._result = result
        waiting, self._waiters = self._waiters, []
        for waiter in waiting:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)


class DownloadCache:
    """Documents downloaded once per pilot (see the module docstring).

    ``directory`` holds the cached copies (created if needed; the service owns its
    life).  ``in_thread`` runs the disk work (writes, copies) off the reactor.
    """

    def __init__(
        self,
        client: PandaClient,
        directory: Path,
        clock: IReactorTime,
        in_thread: ThreadRunner,
        *,
        max_age: float = MAX_AGE,
        limit: int = DOCUMENT_LIMIT,
    ) -> None:
        self._client = client
        self._directory = directory
        self._clock = clock
        self._in_thread = in_thread
        self.max_age = max_age
        self.limit = limit
        self._entries: dict[str, _Entry] = {}
        self._pending: dict[str, _Shared] = {}
        self._serial = 0
        self.downloads = 0
        self.revalidations = 0

    async def fetch(self, url: str, destination: Path, *, checksum: str | None = None) -> Path:
        """``url``'s content in ``destination`` (a fresh copy of the cached file; the caller sets its mode).

        Raises ServerError subclasses as ``PandaClient`` does, ChecksumMismatch,
        LocalFileError (disk), ValueError (a malformed ``checksum``).
        """
        expected = Checksum.parse(checksum) if checksum else None
        entry = self._with_checksum(expected) if expected else None
        if entry is None:
            entry = await self._entry(url, fresh_enough=expected is None)
            if expected is not None and not expected.matches(entry.facts):
                raise ChecksumMismatch(
                    f"{url}: checksum {entry.facts.adler32 if expected.kind == 'adler32' else entry.facts.md5}"
                    f" ({expected.kind}), expected {expected.value}"
                )
        try:
            await self._in_thread(_copy, entry.path, destination)
        except OSError as exc:
            raise LocalFileError(f"cannot copy {url} to {destination}: {exc.strerror}", exc.errno) from None
        return destination

    def _with_checksum(self, expected: Checksum) -> _Entry | None:
        return next((e for e in self._entries.values() if expected.matches(e.facts)), None)

    async def _entry(self, url: str, *, fresh_enough: bool) -> _Entry:
        entry = self._entries.get(url)
        if entry is not None and fresh_enough and self._clock.seconds() - entry.checked < self.max_age:
            return entry
        shared = self._pending.get(url)
        if shared is None:
            work = Deferred.fromCoroutine(self._refresh(url, entry))
            shared = self._pending[url] = _Shared(work)
            work.addBoth(self._settled, url)
        return await shared.wait()

    def _settled(self, result: object, url: str) -> None:
        del self._pending[url]

    async def _refresh(self, url: str, entry: _Entry | None) -> _Entry:
        await self._in_thread(self._directory.mkdir, parents=True, exist_ok=True)
        self._serial += 1
        target = self._directory / hashlib.sha256(url.encode("utf-8")).hexdigest()[:32]
        partial = target.with_name(f"{target.name}.part{self._serial}")
        try:
            result = await self._client.download(
                url,
                partial,
                in_thread=self._in_thread,
                limit=self.limit,
                etag=entry.etag if entry else None,
                last_modified=entry.last_modified if entry else None,
            )
        except ServerError as exc:
            if entry is None:
                raise
            log.warn(
                "cannot revalidate the cached copy of {url} ({error}); using it",
                url=url,
                error=str(exc),
                event="download.stale_copy",
            )
            return entry
        now = self._clock.seconds()
        if entry is not None:
            self.revalidations += 1
        if not result.modified:
            assert entry is not None
            entry.checked = now
            return entry
        assert result.facts is not None
        await self._in_thread(partial.replace, target)
        self.downloads += 1
        fresh = _Entry(target, result.facts, result.etag, result.last_modified, now)
        self._entries[url] = fresh
        log.info(
            "downloaded {url} ({size} bytes, adler32 {adler32})",
            url=url,
            size=result.facts.size,
            adler32=result.facts.adler32,
            event="download.done",
        )
        return fresh


def _copy(source: Path, destination: Path) -> None:
    shutil.copyfile(source, destination)
