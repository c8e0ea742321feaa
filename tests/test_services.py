"""Smoke tests of the real storage services the staging tests use (see ``services.py``)."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from .services import FakeGCSServer, MotoServer, RucioServer, XRootDServer, http, require_tool, run


class ServiceSmokeTests(TestCase):
    timeout = 120

    async def test_xrootd_root_and_davs(self) -> None:
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        server = await XRootDServer.start()
        self.addCleanup(server.stop)
        data = os.urandom(100_000)
        (base / "f").write_bytes(data)
        env = server.client_env()
        code, out = await run(
            [require_tool("xrdcp"), "-f", "-N", str(base / "f"), f"{server.root_url}//smoke/f"], env
        )
        self.assertEqual(code, 0, out)
        self.assertEqual(server.path_of("/smoke/f").read_bytes(), data)
        code, out = await run([require_tool("xrdfs"), server.root_url, "query", "checksum", "/smoke/f"], env)
        self.assertIn(f"{zlib.adler32(data) & 0xFFFFFFFF:08x}", out)
        code, out = await run(
            [require_tool("gfal-copy"), "-f", f"file://{base / 'f'}", f"{server.davs_url}/smoke/g"], env
        )
        self.assertEqual(code, 0, out)
        self.assertEqual(server.path_of("/smoke/g").read_bytes(), data)

    async def test_moto(self) -> None:
        server = await MotoServer.start(Path(self.mktemp()).absolute())
        self.addCleanup(server.stop)
        client = server.boto3()
        await deferToThread(client.create_bucket, Bucket="smoke")
        await deferToThread(client.put_object, Bucket="smoke", Key="k", Body=b"v")
        body = await deferToThread(lambda: client.get_object(Bucket="smoke", Key="k")["Body"].read())
        self.assertEqual(body, b"v")

    async def test_fake_gcs(self) -> None:
        """A bucket, an object uploaded through the JSON API, read back and found on disk."""
        server = await FakeGCSServer.start(Path(self.mktemp()).absolute())
        self.addCleanup(server.stop)
        await server.create_bucket("smoke")
        client = http()
        bucket = await client.get(f"{server.url}/storage/v1/b/smoke")
        self.assertEqual((bucket.code, json.loads(await bucket.content())["name"]), (200, "smoke"))
        data = os.urandom(10_000)
        upload = await client.post(
            f"{server.url}/upload/storage/v1/b/smoke/o",
            params={"uploadType": "media", "name": "k"},
            data=data,
        )
        self.assertEqual((upload.code, json.loads(await upload.content())["size"]), (200, str(len(data))))
        body = await client.get(f"{server.url}/storage/v1/b/smoke/o/k", params={"alt": "media"})
        self.assertEqual((body.code, await body.content()), (200, data))
        self.assertEqual((server.directory / "root" / "smoke" / "k").read_bytes(), data)

    async def test_rucio(self) -> None:
        base = Path(self.mktemp()).absolute()
        server = await RucioServer.start(base / "rucio")
        self.addCleanup(server.stop)
        (base / "up.dat").write_bytes(b"rucio smoke")
        env = server.client_env()
        rucio = str(server.client_venv / "bin" / "rucio")
        code, out = await run(
            [
                rucio,
                "--legacy",
                "upload",
                "--rse",
                "STG_POSIX",
                "--scope",
                server.scope,
                str(base / "up.dat"),
            ],
            env,
        )
        self.assertEqual(code, 0, out)
        code, out = await run(
            [rucio, "--legacy", "download", "--dir", str(base / "dl"), f"{server.scope}:up.dat"], env
        )
        self.assertEqual(code, 0, out)
        self.assertEqual((base / "dl" / server.scope / "up.dat").read_bytes(), b"rucio smoke")
