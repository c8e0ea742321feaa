"""Checksumming an input while it is written (``pilot.staging.follow``).

The follower is an optimisation: whatever the writer does (in order, out of order,
replace, truncate, never create), its result is either the file's true checksum or
None.  Writers run in threads here, so the interleavings are real ones.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from pilot.staging.follow import ChecksumFollower, _data_end
from pilot.util.checksum import file_facts

BLOCK = 1 << 20


class FollowerTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir(parents=True)
        self.path = self.dir / "input.bin"

    async def follow_while(self, write: object, *, md5: bool = False) -> ChecksumFollower:
        """Run ``write()`` in a thread while a follower follows ``self.path``; then finish it."""
        follower = ChecksumFollower(self.path, md5=md5, poll=0.001)
        following = deferToThread(follower.run)
        assert callable(write)
        await deferToThread(write)
        follower.finish()
        await following
        return follower

    async def test_sequential_writer(self) -> None:
        blocks = [os.urandom(BLOCK) for _ in range(24)]

        def write() -> None:
            with self.path.open("wb") as handle:
                for block in blocks:
                    handle.write(block)
                    handle.flush()

        follower = await self.follow_while(write, md5=True)
        self.assertEqual(follower.result, file_facts(self.path, md5=True))

    async def test_out_of_order_writer_is_never_wrong(self) -> None:
        blocks = [os.urandom(BLOCK) for _ in range(16)]
        order = [i ^ 1 for i in range(16)]  # 1, 0, 3, 2, ...: every second block arrives early

        def write() -> None:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                for i in order:
                    os.pwrite(fd, blocks[i], i * BLOCK)
            finally:
                os.close(fd)

        for _ in range(5):
            follower = await self.follow_while(write)
            if follower.result is not None:
                self.assertEqual(follower.result, file_facts(self.path))
            self.path.unlink()

    def test_data_ends_at_the_first_hole(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(os.close, fd)
        os.pwrite(fd, b"x" * 4096, 0)
        os.pwrite(fd, b"y" * 4096, 4 * BLOCK)
        self.assertLess(_data_end(fd, 0), 4 * BLOCK, "the unwritten middle is not data")
        self.assertEqual(_data_end(fd, os.fstat(fd).st_size), os.fstat(fd).st_size)

    async def test_replaced_file_gives_no_result(self) -> None:
        def write() -> None:
            self.path.write_bytes(os.urandom(BLOCK))
            replacement = self.dir / "tmp"
            replacement.write_bytes(os.urandom(BLOCK))
            os.replace(replacement, self.path)

        follower = await self.follow_while(write)
        if follower.result is not None:  # only if it opened the replacement in the first place
            self.assertEqual(follower.result, file_facts(self.path))

    async def test_truncated_file_gives_no_wrong_result(self) -> None:
        def write() -> None:
            with self.path.open("wb") as handle:
                handle.write(os.urandom(4 * BLOCK))
                handle.flush()
                handle.truncate(0)
                handle.seek(0)
                handle.write(b"short")

        follower = await self.follow_while(write)
        if follower.result is not None:
            self.assertEqual(follower.result, file_facts(self.path))

    async def test_file_that_never_appears(self) -> None:
        follower = await self.follow_while(lambda: None)
        self.assertIsNone(follower.result)

    async def test_abandon_stops_a_follower_waiting_for_more(self) -> None:
        self.path.write_bytes(b"partial")
        follower = ChecksumFollower(self.path, poll=0.001)
        started = threading.Event()
        original = follower._finished.wait

        def wait(timeout: float | None = None) -> bool:
            started.set()
            return original(timeout)

        follower._finished.wait = wait  # type: ignore[method-assign]
        following = deferToThread(follower.run)
        await deferToThread(started.wait, 10)
        follower.abandon()
        await following
        self.assertIsNone(follower.result)
