"""Every copytool against its real server: stage-out then stage-in, checksums verified.

XRootD (xrdcp over root://, gfal over root:// and davs://), S3 (moto), GCS
(fake-gcs-server) and Rucio (a real server with POSIX and XRootD RSEs).  Each
round trip goes through the staging engine, so the same verification as in a job
applies; failures are checked for their PanDA codes.
"""

from __future__ import annotations

import os
import uuid
import zlib
from pathlib import Path
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor as _reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from pilot.errorcodes import ErrorCode
from pilot.model.job import Checksum
from pilot.staging.credentials import Credentials
from pilot.staging.engine import StagingEngine
from pilot.staging.plan import FileTransfer
from pilot.staging.registry import CopytoolRegistry
from pilot.staging.tools.base import ToolContext
from pilot.staging.transfer import Attempt, Direction

from .services import FakeGCSServer, MotoServer, RucioServer, XRootDServer, free_port

reactor: Any = _reactor


def adler(data: bytes) -> Checksum:
    return Checksum("adler32", f"{zlib.adler32(data) & 0xFFFFFFFF:08x}")


class RoundTrip:
    """An engine over real tools, a work directory and helpers for one test."""

    def __init__(
        self,
        test: TestCase,
        env: dict[str, str],
        *,
        http: HTTPClient | None = None,
        credentials: dict[str, str] | None = None,
    ) -> None:
        self.base = Path(test.mktemp()).absolute()
        self.out_dir = self.base / "out"
        self.in_dir = self.base / "in"
        self.out_dir.mkdir(parents=True)
        self.in_dir.mkdir()
        self.context = ToolContext(
            spawner=reactor,
            clock=reactor,
            in_thread=deferToThread,
            env=env,
            logdir=self.base / "logs",
            http=http,
            credentials=Credentials(credentials or {}),
        )
        self.engine = StagingEngine(CopytoolRegistry(), self.context)

    def outbound(self, lfn: str, data: bytes, tool: str, remote: str, **settings: Any) -> FileTransfer:
        (self.out_dir / lfn).write_bytes(data)
        return FileTransfer(
            Direction.OUT, lfn, "user.stg", str(uuid.uuid4()), self.out_dir / lfn, len(data), adler(data), "pw",
            [Attempt(tool, remote, "E", settings=settings)],
        )  # fmt: skip

    def inbound(
        self, lfn: str, data: bytes, tool: str, remotes: list[str], *, endpoint: str = "E", **settings: Any
    ) -> FileTransfer:
        return FileTransfer(
            Direction.IN, lfn, "user.stg", str(uuid.uuid4()), self.in_dir / lfn, len(data), adler(data), "pr",
            [Attempt(tool, r, endpoint, settings=settings) for r in remotes],
        )  # fmt: skip

    async def run(self, *transfers: FileTransfer) -> None:
        await self.engine.run(list(transfers))


class XRootDToolsTests(TestCase):
    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]  # trial awaits it
        self.xrd = await XRootDServer.start()
        self.addCleanup(self.xrd.stop)
        self.trip = RoundTrip(self, self.xrd.client_env())

    async def _round_trip(self, tool: str, base_url: str) -> None:
        data = os.urandom(3 * 1024 * 1024 + 17)
        url = f"{base_url}/{tool}/rt.bin" if base_url.startswith("davs") else f"{base_url}//{tool}/rt.bin"
        out = self.trip.outbound("rt.bin", data, tool, url)
        await self.trip.run(out)
        self.assertTrue(out.done, out.error)
        self.assertTrue(out.verified_remotely, "the far end checked the adler32")
        self.assertEqual(self.xrd.path_of(f"/{tool}/rt.bin").read_bytes(), data)
        back = self.trip.inbound("rt.bin", data, tool, [url])
        await self.trip.run(back)
        self.assertTrue(back.done, back.error)
        self.assertEqual((self.trip.in_dir / "rt.bin").read_bytes(), data)

    async def test_xrdcp_round_trip(self) -> None:
        await self._round_trip("xrdcp", self.xrd.root_url)

    async def test_gfal_round_trip_root(self) -> None:
        await self._round_trip("gfal", self.xrd.root_url)

    async def test_gfal_round_trip_davs(self) -> None:
        await self._round_trip("gfal", self.xrd.davs_url)

    async def test_missing_wrong_checksum_and_dead_server(self) -> None:
        data = b"payload input"
        target = self.xrd.path_of("/x/good.bin")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        missing = self.trip.inbound("absent.bin", data, "xrdcp", [f"{self.xrd.root_url}//x/absent.bin"])
        corrupt = self.trip.inbound("good.bin", data, "xrdcp", [f"{self.xrd.root_url}//x/good.bin"])
        corrupt.checksum = Checksum("adler32", "deadbeef")
        dead = self.trip.inbound("dead.bin", data, "gfal", [f"root://127.0.0.1:{free_port()}//x/dead.bin"])
        await self.trip.run(missing, corrupt, dead)
        assert missing.error is not None and corrupt.error is not None and dead.error is not None
        self.assertEqual(missing.error.code, ErrorCode.MISSINGINPUTFILE)
        self.assertEqual(corrupt.error.code, ErrorCode.GETADMISMATCH)
        self.assertFalse((self.trip.in_dir / "good.bin").exists(), "the bad copy is removed")
        self.assertEqual(dead.error.code, ErrorCode.STAGEINFAILED)
        self.assertIn("onnection refused", dead.error.detail)

    async def test_xrdcp_bulk_stage_in_with_fallback(self) -> None:
        """Ten inputs in one xrdcp; the one missing at the first endpoint comes from the second."""
        files = {f"b{i}.bin": os.urandom(50_000 + i) for i in range(10)}
        for lfn, data in files.items():
            where = "/b" if lfn == "b3.bin" else "/a"
            self.xrd.path_of(f"{where}/{lfn}").parent.mkdir(parents=True, exist_ok=True)
            self.xrd.path_of(f"{where}/{lfn}").write_bytes(data)
        spawned = len(list(self.trip.context.logdir.glob("*")))
        transfers = [
            self.trip.inbound(
                lfn, data, "xrdcp", [f"{self.xrd.root_url}//a/{lfn}", f"{self.xrd.root_url}//b/{lfn}"]
            )
            for lfn, data in files.items()
        ]
        await self.trip.run(*transfers)
        self.assertTrue(all(t.done for t in transfers), [t.error for t in transfers])
        self.assertEqual({t.lfn: t.tries for t in transfers if t.tries != 1}, {"b3.bin": 2})
        commands = len(list(self.trip.context.logdir.glob("*"))) - spawned
        self.assertEqual(commands, 2, "one xrdcp for the batch, one for the fallback")
        for lfn, data in files.items():
            self.assertEqual((self.trip.in_dir / lfn).read_bytes(), data)

    async def test_second_replica(self) -> None:
        data = b"replicated"
        self.xrd.path_of("/b/r.bin").parent.mkdir(parents=True)
        self.xrd.path_of("/b/r.bin").write_bytes(data)
        t = self.trip.inbound(
            "r.bin", data, "xrdcp", [f"{self.xrd.root_url}//a/r.bin", f"{self.xrd.root_url}//b/r.bin"]
        )
        await self.trip.run(t)
        self.assertTrue(t.done and t.tries == 2)


def _plain_http() -> tuple[HTTPClient, HTTPConnectionPool]:
    pool = HTTPConnectionPool(reactor, persistent=False)
    return HTTPClient(Agent(reactor, pool=pool)), pool


class ObjectStoreTests(TestCase):
    timeout = 120

    async def test_s3_round_trip(self) -> None:
        moto = await MotoServer.start(Path(self.mktemp()).absolute())
        self.addCleanup(moto.stop)
        await deferToThread(moto.boto3().create_bucket, Bucket="pilot")
        http, _ = _plain_http()
        keys = {"AWS_ACCESS_KEY_ID": moto.access_key, "AWS_SECRET_ACCESS_KEY": moto.secret_key}
        trip = RoundTrip(self, {"PATH": "/usr/bin:/bin"}, http=http, credentials=keys)
        data = os.urandom(2 * 1024 * 1024)
        url = f"s3://127.0.0.1:{moto.port}/pilot/logs/user.stg/f.tgz"
        for tool in ("s3", "objectstore"):
            out = trip.outbound("f.tgz", data, tool, url, secure=False)
            await trip.run(out)
            self.assertTrue(out.done and out.verified_remotely, out.error)
            stored = await deferToThread(
                lambda: moto.boto3().get_object(Bucket="pilot", Key="logs/user.stg/f.tgz")["Body"].read()
            )
            self.assertEqual(stored, data)
            back = trip.inbound("f.tgz", data, tool, [url], secure=False)
            await trip.run(back)
            self.assertTrue(back.done, back.error)
            self.assertEqual((trip.in_dir / "f.tgz").read_bytes(), data)
            (trip.in_dir / "f.tgz").unlink()
        absent = trip.inbound("absent", data, "s3", [url + ".absent"], secure=False)
        unsigned = RoundTrip(self, {"PATH": "/usr/bin:/bin"}, http=http, credentials={})
        nokeys = unsigned.inbound("f.tgz", data, "s3", [url], secure=False)
        await trip.run(absent)
        await unsigned.run(nokeys)
        assert absent.error is not None and nokeys.error is not None
        self.assertEqual(absent.error.code, ErrorCode.MISSINGINPUTFILE)
        self.assertEqual(nokeys.error.code, ErrorCode.MISSINGCREDENTIALS)

    async def test_gcs_round_trip(self) -> None:
        gcs = await FakeGCSServer.start(Path(self.mktemp()).absolute())
        self.addCleanup(gcs.stop)
        await gcs.create_bucket("pilot")
        http, _ = _plain_http()
        trip = RoundTrip(
            self, {"PATH": "/usr/bin:/bin"}, http=http, credentials={"GCS_ACCESS_TOKEN": "test-token"}
        )
        data = os.urandom(1024 * 1024 + 3)
        url = "gs://pilot/logs/user.stg/f.tgz"
        out = trip.outbound("f.tgz", data, "gs", url, api=gcs.url)
        await trip.run(out)
        self.assertTrue(out.done and out.verified_remotely, out.error)
        back = trip.inbound("f.tgz", data, "gs", [url], api=gcs.url)
        await trip.run(back)
        self.assertTrue(back.done, back.error)
        self.assertEqual((trip.in_dir / "f.tgz").read_bytes(), data)
        absent = trip.inbound("x", data, "gs", ["gs://pilot/none"], api=gcs.url)
        await trip.run(absent)
        assert absent.error is not None
        self.assertEqual(absent.error.code, ErrorCode.MISSINGINPUTFILE)


class RucioToolTests(TestCase):
    timeout = 180

    async def test_rucio_upload_and_download(self) -> None:
        base = Path(self.mktemp()).absolute()
        xrd = await XRootDServer.start()
        self.addCleanup(xrd.stop)
        rucio = await RucioServer.start(base / "rucio", xrootd=xrd)
        self.addCleanup(rucio.stop)
        trip = RoundTrip(self, rucio.client_env())
        for rse in ("STG_POSIX", "STG_XRD"):
            data = os.urandom(500_000)
            lfn = f"{rse.lower()}.dat"
            out = trip.outbound(lfn, data, "rucio", rse)
            out.scope = rucio.scope
            await trip.run(out)
            self.assertTrue(out.done and out.verified_remotely, out.error)
            self.assertIn(lfn, out.remote_url)
            back = trip.inbound(lfn, data, "rucio", [f"{rucio.scope}:{lfn}"], endpoint=rse)
            await trip.run(back)
            self.assertTrue(back.done, back.error)
            self.assertEqual((trip.in_dir / lfn).read_bytes(), data)
        missing = trip.inbound("never.dat", b"x", "rucio", [f"{rucio.scope}:never.dat"], endpoint="")
        await trip.run(missing)
        assert missing.error is not None
        self.assertEqual(missing.error.code, ErrorCode.MISSINGINPUTFILE)
