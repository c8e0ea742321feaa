"""Copytools that need no server: cp/mv/ln on real files, lsm with a faithful stand-in,
the S3 request signer against AWS's published example."""

from __future__ import annotations

import datetime
import hashlib
import os
import zlib
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from pilot.errorcodes import ErrorCode
from pilot.model.job import Checksum
from pilot.staging.credentials import Credentials, S3Keys
from pilot.staging.interfaces import ICopyTool
from pilot.staging.registry import CopytoolRegistry
from pilot.staging.tools.base import ToolContext
from pilot.staging.tools.s3 import http_url, sign_v4
from pilot.staging.transfer import CopyRequest, Direction, TransferError

from .harness import mount_small_tmpfs

reactor: Any = _reactor

#: lsm-get / lsm-put as a site provides them, reduced to their argument convention
#: (Pilot 3's): `lsm-get SRC DST`; `lsm-put --size N -t TOKEN --checksum adler32:X
#: --guid G SRC DST`, which verifies the checksum and fails with the usual wording.
LSM_GET = """#!/bin/bash
set -u
[ $# -eq 2 ] || { echo "usage: lsm-get SRC DST" >&2; exit 2; }
src=${1#file://}
[ -f "$src" ] || { echo "lsm-get: $src: No such file or directory" >&2; exit 3; }
cp -- "$src" "$2"
"""
LSM_PUT = """#!/bin/bash
set -u
size= token= checksum= guid=
while [ $# -gt 2 ]; do
  case "$1" in
    --size) size=$2; shift 2;; -t) token=$2; shift 2;; --checksum) checksum=$2; shift 2;; --guid) guid=$2; shift 2;;
    *) echo "lsm-put: unknown option $1" >&2; exit 2;;
  esac
done
src=$1 dst=${2#file://}
[ "$(stat -c %s "$src")" = "$size" ] || { echo "lsm-put: size mismatch" >&2; exit 4; }
mkdir -p "$(dirname "$dst")" && cp -- "$src" "$dst" || exit 6
echo "$token $guid" > "$dst.meta"
actual=$(python3 -c 'import sys, zlib; print("%08x" % (zlib.adler32(open(sys.argv[1], "rb").read()) & 0xffffffff))' "$dst")
[ "adler32:$actual" = "$checksum" ] || { rm -f "$dst"; echo "lsm-put: checksum mismatch" >&2; exit 5; }
"""


def adler(data: bytes) -> Checksum:
    return Checksum("adler32", f"{zlib.adler32(data) & 0xFFFFFFFF:08x}")


class LocalToolTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        (self.base / "storage" / "sub").mkdir(parents=True)
        (self.base / "work").mkdir()
        (self.base / "bin").mkdir()
        self.context = ToolContext(
            spawner=reactor,
            clock=reactor,
            in_thread=deferToThread,
            env={"PATH": f"{self.base / 'bin'}:/usr/bin:/bin"},
            logdir=self.base / "logs",
        )
        self.registry = CopytoolRegistry()

    def request(
        self, direction: Direction, lfn: str, remote: str, data: bytes = b"", **kw: Any
    ) -> CopyRequest:
        return CopyRequest(
            direction=direction,
            local=self.base / "work" / lfn,
            remote=remote,
            lfn=lfn,
            scope="s",
            guid=kw.pop("guid", "G-1"),
            size=len(data),
            checksum=adler(data),
            endpoint="LOCAL",
            timeout=60,
            **kw,
        )

    def test_every_tool_provides_the_interface(self) -> None:
        for name in ("cp", "mv", "ln", "xrdcp", "gfal", "lsm", "s3", "objectstore", "gs", "rucio"):
            verifyObject(ICopyTool, self.registry.get(name))

    async def test_cp_in_and_out(self) -> None:
        source = self.base / "storage" / "a.root"
        source.write_bytes(b"events")
        cp = self.registry.get("cp")
        await cp.copy_in(self.request(Direction.IN, "a.root", f"file://{source}", b"events"), self.context)
        self.assertEqual((self.base / "work" / "a.root").read_bytes(), b"events")
        self.assertTrue(source.exists())
        destination = self.base / "storage" / "out" / "deep" / "a.root"
        await cp.copy_out(
            self.request(Direction.OUT, "a.root", f"file://{destination}", b"events"), self.context
        )
        self.assertEqual(destination.read_bytes(), b"events")

    async def test_mv_moves_and_ln_links(self) -> None:
        source = self.base / "storage" / "m.root"
        source.write_bytes(b"m")
        await self.registry.get("mv").copy_in(
            self.request(Direction.IN, "m.root", str(source), b"m"), self.context
        )
        self.assertFalse(source.exists())
        linked = self.base / "storage" / "l.root"
        linked.write_bytes(b"l")
        await self.registry.get("ln").copy_in(
            self.request(Direction.IN, "l.root", str(linked), b"l"), self.context
        )
        self.assertTrue((self.base / "work" / "l.root").is_symlink())

    async def test_missing_source(self) -> None:
        cp = self.registry.get("cp")
        with self.assertRaises(TransferError) as raised:
            await cp.copy_in(
                self.request(Direction.IN, "x.root", str(self.base / "storage" / "x.root")), self.context
            )
        self.assertEqual(raised.exception.code, ErrorCode.MISSINGINPUTFILE)
        self.assertTrue(raised.exception.missing)

    async def test_full_destination(self) -> None:
        full = self.base / "full"
        await mount_small_tmpfs(self, full, "64k")
        data = os.urandom(256 * 1024)
        (self.base / "work" / "big.root").write_bytes(data)
        with self.assertRaises(TransferError) as raised:
            await self.registry.get("cp").copy_out(
                self.request(Direction.OUT, "big.root", str(full / "big.root"), data), self.context
            )
        self.assertEqual(raised.exception.code, ErrorCode.NOREMOTESPACE)
        source = self.base / "storage" / "big.root"
        source.write_bytes(data)
        inbound = CopyRequest(
            direction=Direction.IN,
            local=full / "big.root",
            remote=str(source),
            lfn="big.root",
            scope="s",
            guid="g",
            size=len(data),
            checksum=adler(data),
            endpoint="LOCAL",
            timeout=60,
        )
        with self.assertRaises(TransferError) as raised:
            await self.registry.get("cp").copy_in(inbound, self.context)
        self.assertEqual(raised.exception.code, ErrorCode.NOLOCALSPACE)

    async def test_lsm_convention(self) -> None:
        for name, script in (("lsm-get", LSM_GET), ("lsm-put", LSM_PUT)):
            path = self.base / "bin" / name
            path.write_text(script)
            path.chmod(0o755)
        lsm = self.registry.get("lsm")
        source = self.base / "storage" / "in.root"
        source.write_bytes(b"input")
        await lsm.copy_in(self.request(Direction.IN, "in.root", f"file://{source}", b"input"), self.context)
        self.assertEqual((self.base / "work" / "in.root").read_bytes(), b"input")
        (self.base / "work" / "out.root").write_bytes(b"output")
        destination = self.base / "storage" / "put" / "out.root"
        request = self.request(
            Direction.OUT, "out.root", f"file://{destination}", b"output", token="ATLASDATADISK"
        )
        result = await lsm.copy_out(request, self.context)
        self.assertTrue(result.verified_remotely)
        self.assertEqual(destination.read_bytes(), b"output")
        self.assertEqual((destination.parent / "out.root.meta").read_text().split(), ["ATLASDATADISK", "G-1"])
        bad = CopyRequest(**{**request.__dict__, "checksum": Checksum("adler32", "00000000")})
        with self.assertRaises(TransferError) as raised:
            await lsm.copy_out(bad, self.context)
        self.assertEqual(raised.exception.code, ErrorCode.PUTADMISMATCH)

    async def test_missing_tool_is_a_clear_error(self) -> None:
        context = ToolContext(
            spawner=reactor,
            clock=reactor,
            in_thread=deferToThread,
            env={"PATH": str(self.base / "bin")},
            logdir=self.base / "l",
        )
        with self.assertRaises(TransferError) as raised:
            await self.registry.get("xrdcp").copy_in(self.request(Direction.IN, "a", "root://h//a"), context)
        self.assertIn("xrdcp is not installed", raised.exception.detail)
        self.assertFalse(raised.exception.retry_elsewhere)


class S3SigningTests(SynchronousTestCase):
    def test_aws_published_example(self) -> None:
        """AWS's documented GET Object example (SigV4, single chunk)."""
        keys = S3Keys("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
        headers = sign_v4(
            "GET",
            "https://examplebucket.s3.amazonaws.com/test.txt",
            {"range": "bytes=0-9"},
            keys,
            region="us-east-1",
            now=datetime.datetime(2013, 5, 24, tzinfo=datetime.UTC),
            payload_hash=hashlib.sha256(b"").hexdigest(),
        )
        self.assertEqual(
            headers["authorization"],
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
            "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
            "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
        )
        self.assertNotIn(keys.secret_key, repr(keys))

    def test_urls(self) -> None:
        self.assertEqual(http_url("s3://h:9000/b/k/x y", {"secure": False}), "http://h:9000/b/k/x%20y")
        self.assertEqual(http_url("s3://h/b/k", {}), "https://h/b/k")
        self.assertRaises(TransferError, http_url, "s3://h/nobucketkey", {})

    def test_credentials(self) -> None:
        self.assertEqual(
            Credentials({"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "s"}).s3_keys({}).access_key, "a"
        )
        error = self.assertRaises(TransferError, Credentials({}).s3_keys, {})
        self.assertEqual(error.code, ErrorCode.MISSINGCREDENTIALS)


class NoSecretsOnCommandLinesTests(SynchronousTestCase):
    """Whatever a copytool puts on ``/proc/<pid>/cmdline`` is readable by every user."""

    def test_process_tools_keep_secrets_off_argv(self) -> None:
        from twisted.internet.task import Clock

        from .fakes import FakeSpawner, run_sync

        secrets = {
            "AWS_SECRET_ACCESS_KEY": "s3cr3t-key",
            "GCS_ACCESS_TOKEN": "ya29.token",
            "RUCIO_PASSWORD": "hunter2",
        }
        clock = Clock()
        spawner = FakeSpawner(clock)
        workdir = Path(self.mktemp()).absolute()
        workdir.mkdir()
        bindir = workdir / "bin"
        bindir.mkdir()
        for name in ("xrdcp", "gfal-copy", "lsm-get", "lsm-put", "cp", "rucio"):
            (bindir / name).write_text("#!/usr/bin/python3\n")
            (bindir / name).chmod(0o755)
        env = {"PATH": str(bindir), "X509_USER_PROXY": "/tmp/x509up_u0", **secrets}
        context = ToolContext(
            spawner=spawner, clock=clock, in_thread=run_sync, env=env, logdir=workdir / "logs"
        )
        registry = CopytoolRegistry()
        for name, remote in (
            ("xrdcp", "root://h//f"),
            ("gfal", "davs://h/f"),
            ("lsm", "srm://h/f"),
            ("cp", "/s/f"),
            ("rucio", "s:f"),
        ):
            for direction in (Direction.IN, Direction.OUT):
                (workdir / "f").write_bytes(b"x")
                request = CopyRequest(
                    direction=direction,
                    local=workdir / "f",
                    remote=remote if direction is Direction.IN or name != "rucio" else "RSE",
                    lfn="f",
                    scope="s",
                    guid="g",
                    size=1,
                    checksum=adler(b"x"),
                    endpoint="E",
                    timeout=60,
                )
                tool = registry.get(name)
                method = tool.copy_in if direction is Direction.IN else tool.copy_out
                d = method(request, context)
                d.addErrback(lambda f: None)
                clock.advance(0)
        programs = {Path(p.command[0]).name for p in spawner.processes}
        self.assertEqual(
            programs, {"xrdcp", "gfal-copy", "lsm-get", "lsm-put", "cp", "python3"}, "every tool ran"
        )
        for process in spawner.processes:
            command = " ".join(process.args)
            for value in secrets.values():
                self.assertNotIn(value, command, process.args)
