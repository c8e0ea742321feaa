"""``pilot.eventservice.archive`` and ``batches``: real tar files of real outputs, batches on a Clock."""

from __future__ import annotations

import os
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pilot.errorcodes import ErrorCode
from pilot.eventservice.archive import (
    ARCHIVE_PREFIX,
    ArchiveMember,
    OutputRefused,
    archive_name,
    build_archive,
    checked_output,
)
from pilot.eventservice.batches import Batcher, DoneRange, StoredArchive
from pilot.eventservice.ranges import parse_event_range
from pilot.server.events import ArchiveChunk, RangeStatus
from tests.test_es_engine import Store, in_thread, make_range


def adler32_of(path: Path) -> str:
    return f"{zlib.adler32(path.read_bytes()) & 0xFFFFFFFF:08x}"


def members_of(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        out: dict[str, bytes] = {}
        for member in tar.getmembers():
            handle = tar.extractfile(member)
            assert handle is not None
            out[member.name] = handle.read()
        return out


class Directories(SynchronousTestCase):
    def setUp(self) -> None:
        base = Path(self.mktemp()).absolute()
        self.workdir = base / "work"
        self.outside = base / "outside"
        self.workdir.mkdir(parents=True)
        self.outside.mkdir()
        (base / "remote").mkdir()
        self.remote = base / "remote"

    def output(self, name: str, data: bytes) -> Path:
        path = self.workdir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path


class CheckedOutputTests(Directories):
    def test_a_file_inside_the_work_directory(self) -> None:
        path = self.output("sub/out.root", b"x")
        self.assertEqual(checked_output(str(path), self.workdir), path)
        self.assertEqual(checked_output("sub/out.root", self.workdir), path)  # relative to the work directory

    def test_a_symlink_inside_pointing_inside_is_its_target(self) -> None:
        target = self.output("real.root", b"x")
        (self.workdir / "link.root").symlink_to(target)
        self.assertEqual(checked_output(str(self.workdir / "link.root"), self.workdir), target)

    def test_refused_outputs(self) -> None:
        secret = self.outside / "proxy"
        secret.write_bytes(b"-----BEGIN")
        (self.workdir / "escape.root").symlink_to(secret)
        (self.workdir / "adir").mkdir()
        os.mkfifo(self.workdir / "fifo")
        cases = {
            str(secret): "outside",
            "../outside/proxy": "outside",
            str(self.workdir / "escape.root"): "outside",
            str(self.workdir / "adir"): "not a regular file",
            str(self.workdir): "not a regular file",
            str(self.workdir / "fifo"): "not a regular file",
            str(self.workdir / "missing.root"): "cannot be read",
        }
        for text, why in cases.items():
            with self.assertRaises(OutputRefused, msg=text) as caught:
                checked_output(text, self.workdir)
            self.assertIn(why, str(caught.exception), text)


class BuildArchiveTests(Directories):
    def test_the_tar_holds_the_outputs_and_its_facts_are_the_file_on_disk(self) -> None:
        a = self.output("a.root", os.urandom(70000))
        b = self.output("deep/b.root", b"b" * 3)
        built = build_archive(
            [ArchiveMember("r1", a), ArchiveMember("r2", b)], self.workdir, self.workdir / "x.tar"
        )
        self.assertEqual(built.path, self.workdir / "x.tar")
        self.assertEqual(members_of(built.path), {"a.root": a.read_bytes(), "b.root": b"bbb"})
        self.assertEqual(built.facts.size, built.path.stat().st_size)
        self.assertEqual(built.facts.adler32, adler32_of(built.path))
        self.assertEqual(built.members, ("r1", "r2"))
        self.assertEqual(built.refused, {})
        self.assertEqual(built.files, (a, b))
        self.assertFalse((self.workdir / "x.tar.part").exists())
        with tarfile.open(built.path) as tar:
            for info in tar.getmembers():
                self.assertEqual((info.uid, info.gid, info.uname, info.gname), (0, 0, "", ""))

    def test_refused_outputs_fail_their_range_only(self) -> None:
        good = self.output("good.root", b"good")
        (self.outside / "x").write_bytes(b"secret")
        (self.workdir / "escape").symlink_to(self.outside / "x")
        (self.workdir / "adir").mkdir()
        built = build_archive(
            [
                ArchiveMember("outside", self.outside / "x"),
                ArchiveMember("good", good),
                ArchiveMember("symlink", self.workdir / "escape"),
                ArchiveMember("directory", self.workdir / "adir"),
                ArchiveMember("missing", self.workdir / "nothing"),
            ],
            self.workdir,
            self.workdir / "y.tar",
        )
        self.assertEqual(built.members, ("good",))
        self.assertEqual(set(built.refused), {"outside", "symlink", "directory", "missing"})
        self.assertEqual(members_of(built.path), {"good.root": b"good"})
        self.assertEqual((self.outside / "x").read_bytes(), b"secret")

    def test_two_ranges_naming_the_same_output(self) -> None:
        shared = self.output("shared.root", b"s")
        built = build_archive(
            [ArchiveMember("first", shared), ArchiveMember("second", shared)],
            self.workdir,
            self.workdir / "z.tar",
        )
        self.assertEqual(built.members, ("first",))
        self.assertIn("also another range's output", built.refused["second"])
        self.assertEqual(members_of(built.path), {"shared.root": b"s"})

    def test_archive_names(self) -> None:
        self.assertEqual(archive_name("1-2-3-4-5"), f"{ARCHIVE_PREFIX}1-2-3-4-5.tar")
        self.assertEqual(archive_name("a/b:c"), f"{ARCHIVE_PREFIX}a_b_c.tar")
        self.assertLessEqual(len(archive_name("x" * 300)), 250)


class BatcherCase(Directories):
    def setUp(self) -> None:
        super().setUp()
        self.clock = Clock()
        self.store = Store(self.remote)
        self.finished: list[ArchiveChunk] = []
        self.failed: list[RangeStatus] = []
        self.n = 0

    def batcher(self, **kwargs: object) -> Batcher:
        def on_failed(statuses: Sequence[RangeStatus]) -> None:
            self.failed.extend(statuses)

        return Batcher(
            self.clock,
            in_thread,
            self.workdir,
            self.store,
            on_finished=self.finished.append,
            on_failed=on_failed,
            core_count=8,
            **kwargs,  # type: ignore[arg-type]
        )

    def done(self, batcher: Batcher, *, output: str | None = None, events: int = 1) -> str:
        """A finished range with an output of its own (unless ``output`` names one): its id."""
        self.n += 1
        item = parse_event_range(make_range(self.n, events=events))
        if output is None:
            output = str(self.output(f"out.{self.n}.root", f"output {self.n}".encode()))
        batcher.add(DoneRange(item, output, cpu_s=12.3456, wall_s=20.0))
        return item.range_id

    def stored(self) -> StoredArchive:
        return StoredArchive("s3://bucket/x", 42)

    def finished_ids(self) -> list[list[str]]:
        return [[r.range_id for r in chunk.ranges] for chunk in self.finished]


class BatchClosingTests(BatcherCase):
    def test_a_batch_closes_at_max_ranges(self) -> None:
        batcher = self.batcher(max_ranges=3, max_age=60)
        ids = [self.done(batcher) for _ in range(2)]
        self.assertEqual(self.store.calls, [])
        ids.append(self.done(batcher))
        self.assertEqual(len(self.store.calls), 1)
        self.assertEqual(self.finished_ids(), [ids])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_smaller_batch_closes_after_max_age(self) -> None:
        batcher = self.batcher(max_ranges=10, max_age=60)
        first = self.done(batcher)
        self.clock.advance(30)
        second = self.done(batcher)
        self.clock.advance(29.9)
        self.assertEqual(self.store.calls, [])
        self.clock.advance(0.1)  # the oldest has waited max_age
        self.assertEqual(self.finished_ids(), [[first, second]])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        third = self.done(batcher)  # a new batch, a new age
        self.clock.advance(60)
        self.assertEqual(self.finished_ids(), [[first, second], [third]])

    def test_at_most_max_in_flight_batches_and_the_rest_go_into_the_next(self) -> None:
        self.store.hold = True
        batcher = self.batcher(max_ranges=1, max_age=60, max_in_flight=2)
        ids = [self.done(batcher) for _ in range(5)]
        self.assertEqual(len(self.store.calls), 2)
        self.assertEqual(batcher.waiting, 3)
        self.store.held.pop(0).callback(self.stored())
        self.assertEqual(len(self.store.calls), 3)  # the three waiting, in one batch
        self.assertEqual(batcher.waiting, 0)
        for d in list(self.store.held):
            d.callback(self.stored())
        self.assertEqual(self.finished_ids(), [ids[:1], ids[1:2], ids[2:]])

    def test_an_overdue_batch_waits_for_a_free_slot(self) -> None:
        self.store.hold = True
        batcher = self.batcher(max_ranges=1, max_age=60, max_in_flight=1)
        self.done(batcher)
        late = self.done(batcher)
        self.clock.advance(120)
        self.assertEqual(len(self.store.calls), 1)
        self.store.held.pop(0).callback(self.stored())
        self.assertEqual(len(self.store.calls), 2)
        self.store.held.pop(0).callback(self.stored())
        self.assertEqual(self.finished_ids()[-1], [late])

    def test_flush_closes_what_waits_and_waits_for_the_store(self) -> None:
        self.store.hold = True
        batcher = self.batcher(max_ranges=10, max_age=600)
        ids = [self.done(batcher), self.done(batcher)]
        flushed = Deferred.fromCoroutine(batcher.flush())
        self.assertEqual(len(self.store.calls), 1)
        self.assertNoResult(flushed)
        self.store.held.pop(0).callback(self.stored())
        self.successResultOf(flushed)
        self.assertEqual(self.finished_ids(), [ids])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel_starts_no_batch_behind_the_cancelled_ones(self) -> None:
        self.store.hold = True
        batcher = self.batcher(max_ranges=1, max_age=60, max_in_flight=1)
        self.done(batcher)
        self.done(batcher)
        flushed = Deferred.fromCoroutine(batcher.flush())
        batcher.cancel()
        self.successResultOf(flushed)
        self.assertEqual(len(self.store.calls), 1)
        self.assertEqual(self.finished, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class BatchOutcomeTests(BatcherCase):
    def test_the_chunk_carries_the_archive_facts(self) -> None:
        self.store.hold = True
        batcher = self.batcher(max_ranges=2, max_age=60)
        a = self.done(batcher, events=3)
        outputs = [self.workdir / f"out.{self.n}.root"]
        b = self.done(batcher, events=5)
        outputs.append(self.workdir / f"out.{self.n}.root")
        ((path, lfn, size, adler32),) = self.store.calls
        # outputs removed once archived, the archive kept until stored
        self.assertFalse(any(o.exists() for o in outputs))
        self.assertTrue(path.exists())
        self.assertEqual(lfn, archive_name(a))
        self.assertEqual(path, self.workdir / lfn)
        self.assertEqual((size, adler32), (path.stat().st_size, adler32_of(path)))
        self.assertEqual(members_of(path), {"out.1.root": b"output 1", "out.2.root": b"output 2"})
        self.store.held.pop(0).callback(self.stored())
        self.assertFalse(path.exists())
        (chunk,) = self.finished
        self.assertEqual(
            (chunk.lfn, chunk.fsize, chunk.adler32, chunk.num_events, chunk.objstore_id),
            (lfn, size, adler32, 8, 42),
        )
        self.assertEqual(
            chunk.wire()["zipFile"],
            {
                "lfn": lfn,
                "fsize": size,
                "adler32": adler32,
                "numEvents": 8,
                "pathConvention": 1000,
                "objstoreID": 42,
            },
        )
        self.assertEqual(
            chunk.ranges,
            (
                RangeStatus(a, "finished", core_count=8, cpu_seconds=12.346, objstore_id=42),
                RangeStatus(b, "finished", core_count=8, cpu_seconds=12.346, objstore_id=42),
            ),
        )
        self.assertEqual((batcher.batches, batcher.bytes), (1, size))
        self.assertEqual(self.failed, [])

    def test_refused_outputs_fail_per_range_and_the_rest_is_archived(self) -> None:
        batcher = self.batcher(max_ranges=6, max_age=60)
        (self.outside / "secret").write_bytes(b"secret")
        (self.workdir / "link").symlink_to(self.outside / "secret")
        (self.workdir / "adir").mkdir()
        good = self.done(batcher)
        outside = self.done(batcher, output=str(self.outside / "secret"))
        link = self.done(batcher, output=str(self.workdir / "link"))
        directory = self.done(batcher, output=str(self.workdir / "adir"))
        missing = self.done(batcher, output=str(self.workdir / "gone.root"))
        also_good = self.done(batcher)
        self.assertEqual(self.finished_ids(), [[good, also_good]])
        self.assertEqual(
            {s.range_id: s.error_code for s in self.failed},
            {i: int(ErrorCode.ESRECOVERABLE) for i in (outside, link, directory, missing)},
        )
        diags = {s.range_id: s.error_diag or "" for s in self.failed}
        self.assertIn("outside", diags[link])
        self.assertIn("not a regular file", diags[directory])
        self.assertTrue((self.outside / "secret").exists())  # never touched
        self.assertEqual(set(members_of(self.remote / self.finished[0].lfn)), {"out.1.root", "out.6.root"})

    def test_two_ranges_with_the_same_output_file(self) -> None:
        batcher = self.batcher(max_ranges=2, max_age=60)
        shared = str(self.output("shared.root", b"both"))
        first = self.done(batcher, output=shared)
        second = self.done(batcher, output=shared)
        self.assertEqual(self.finished_ids(), [[first]])
        self.assertEqual([s.range_id for s in self.failed], [second])

    def test_every_output_refused_stores_nothing(self) -> None:
        batcher = self.batcher(max_ranges=1, max_age=60)
        rid = self.done(batcher, output="/etc/passwd")
        self.assertEqual(self.store.calls, [])
        self.assertEqual([s.range_id for s in self.failed], [rid])
        self.assertEqual(list(self.workdir.glob(f"{ARCHIVE_PREFIX}*")), [])

    def test_a_store_failure_fails_the_batch_recoverably(self) -> None:
        self.store.fail = OSError("the object store said 403")
        batcher = self.batcher(max_ranges=2, max_age=60)
        ids = [self.done(batcher), self.done(batcher)]
        self.assertEqual(self.finished, [])
        self.assertEqual([s.range_id for s in self.failed], ids)
        self.assertEqual({s.status for s in self.failed}, {"failed"})
        self.assertEqual({s.error_code for s in self.failed}, {int(ErrorCode.ESRECOVERABLE)})
        self.assertIn("403", self.failed[0].error_diag or "")
        self.assertEqual((batcher.batches, batcher.bytes), (0, 0))
        # the archive of ranges reported failed is not kept
        self.assertEqual(list(self.workdir.glob(f"{ARCHIVE_PREFIX}*")), [])
