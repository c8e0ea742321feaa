"""Storage descriptions, Rucio paths, and the transfer plan (replica and protocol choice)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from pilot.errorcodes import ErrorCode
from pilot.errors import PilotError
from pilot.model.job import Checksum, JobDefinitionError, OutputFile, parse_job
from pilot.queuedata import QueueData
from pilot.staging.catalog import render_catalog
from pilot.staging.errors import classify
from pilot.staging.plan import plan_stage_in, plan_stage_out, stage_out_configured
from pilot.staging.registry import CopytoolRegistry
from pilot.staging.storage import StorageData, StorageDataError
from pilot.staging.urls import check_scope, rucio_path

STORAGE: dict[str, Any] = {
    "SITE_DISK": {
        "is_deterministic": True,
        "token": "ATLASDATADISK",
        "arprotocols": {
            "read_lan": [
                {"endpoint": "root://xrd.site:1094", "path": "/data/", "priority": 1},
                {"endpoint": "davs://dav.site:443", "path": "/data", "priority": 2},
            ],
            "write_lan": [{"endpoint": "root://xrd.site:1094", "path": "/data/"}],
        },
    },
    "OTHER_DISK": {
        "aprotocols": {"r": [["davs://other:8443", 1, "/rucio/"]], "w": [["davs://other:8443", 1, "/rucio/"]]}
    },
    "FAR_DISK": {"arprotocols": {"read_wan": [{"endpoint": "https://far:443", "path": "/d/"}]}},
    "TAPE": {
        "is_deterministic": False,
        "arprotocols": {"read_lan": [{"endpoint": "root://tape", "path": "/"}]},
    },
}


def queue(**raw: Any) -> QueueData:
    base: dict[str, Any] = {
        "nickname": "Q",
        "acopytools": {"pr": ["xrdcp", "gfal"], "pw": ["gfal"], "pl": ["xrdcp"]},
        "astorages": {
            "read_lan": ["SITE_DISK", "OTHER_DISK"],
            "read_wan": ["FAR_DISK"],
            "pw": ["SITE_DISK", "OTHER_DISK"],
        },
    }
    base.update(raw)
    return QueueData.from_dict(base, "Q")


def job(**extra: Any) -> Any:
    raw: dict[str, Any] = {
        "PandaID": 1,
        "transformation": "t",
        "inFiles": "a.root,b.root",
        "scopeIn": "mc.data,user.jdoe",
        "ddmEndPointIn": "OTHER_DISK,SITE_DISK",
        "checksum": "ad:00000001,ad:00000002",
        "fsize": "10,20",
        "GUID": "g1,g2",
        "outFiles": "out.root,log.tgz",
        "scopeOut": "mc.out",
        "logFile": "log.tgz",
        "scopeLog": "mc.log",
        "logGUID": "L",
        "ddmEndPointOut": "SITE_DISK,SITE_DISK",
    }
    raw.update(extra)
    return parse_job(raw)


class StorageTests(SynchronousTestCase):
    def test_both_protocol_layouts(self) -> None:
        storage = StorageData.from_document(STORAGE)
        site = storage.get("SITE_DISK")
        assert site is not None
        self.assertEqual([p.scheme for p in site.protocols_for("read_lan")], ["root", "davs"])
        self.assertEqual(site.token, "ATLASDATADISK")
        other = storage.get("OTHER_DISK")
        assert other is not None
        self.assertEqual(other.protocols_for("write_wan")[0].endpoint, "davs://other:8443")

    def test_protocol_urls(self) -> None:
        storage = StorageData.from_document(STORAGE)
        site = storage.get("SITE_DISK")
        assert site is not None
        root, davs = site.protocols_for("read_lan")
        self.assertEqual(root.url("mc/ab/cd/f"), "root://xrd.site:1094//data/mc/ab/cd/f")
        self.assertEqual(davs.url("mc/ab/cd/f"), "davs://dav.site:443/data/mc/ab/cd/f")
        local = StorageData.from_document(
            {"L": {"arprotocols": {"read_lan": [{"endpoint": "file://", "path": "/srv/rse/"}]}}}
        )
        endpoint = local.get("L")
        assert endpoint is not None
        self.assertEqual(endpoint.protocols_for("read_lan")[0].url("s/f"), "file:///srv/rse/s/f")

    def test_bad_descriptions(self) -> None:
        self.assertRaises(StorageDataError, StorageData.from_bytes, b"[1]")
        self.assertRaises(StorageDataError, StorageData.from_bytes, b"{")
        self.assertRaises(
            StorageDataError, StorageData.from_document, {"X": {"arprotocols": {"read_lan": [{}]}}}
        )

    def test_rucio_path(self) -> None:
        # The layout Rucio itself produced for user.stg:upl1.dat (see tools-on-debian.md).
        self.assertEqual(rucio_path("user.stg", "upl1.dat"), "user/stg/73/0e/upl1.dat")
        self.assertTrue(rucio_path("mc16_13TeV", "f").startswith("mc16_13TeV/"))

    def test_scopes(self) -> None:
        self.assertEqual(check_scope("user.jdoe", ErrorCode.STAGEINFAILED), "user.jdoe")
        for bad in ("../etc", "a/b", "-x", ".hidden", "a..b", ""):
            self.assertRaises(PilotError, check_scope, bad, ErrorCode.STAGEINFAILED)


class StageInPlanTests(SynchronousTestCase):
    def plan(self, job_: Any, queuedata: QueueData) -> Any:
        return plan_stage_in(
            job_, Path("/work"), queuedata, StorageData.from_document(STORAGE), CopytoolRegistry()
        )

    def test_lan_before_wan_tools_in_order(self) -> None:
        plan = self.plan(job(), queue())
        a, b = plan.transfers
        self.assertEqual(a.local, Path("/work/a.root"))
        self.assertEqual(a.checksum, Checksum("adler32", "00000001"))
        path = rucio_path("mc.data", "a.root")
        self.assertEqual(
            [(x.tool, x.remote, x.domain) for x in a.attempts],
            [
                # The job's own endpoint (OTHER_DISK) first; it has no root:// door for xrdcp.
                ("xrdcp", f"root://xrd.site:1094//data/{path}", "lan"),
                ("gfal", f"davs://other:8443/rucio/{path}", "lan"),
                ("gfal", f"root://xrd.site:1094//data/{path}", "lan"),
                ("gfal", f"davs://dav.site:443/data/{path}", "lan"),
                ("gfal", f"https://far:443/d/{path}", "wan"),
            ],
        )
        self.assertIn("user/jdoe/", b.attempts[0].remote)

    def test_queue_schemas_restrict_protocols(self) -> None:
        plan = self.plan(job(), queue(acopytools_schemas={"gfal": {"read_lan": ["davs"]}}))
        gfal = [x.remote.split(":")[0] for x in plan.transfers[0].attempts if x.tool == "gfal"]
        self.assertEqual(gfal, ["davs", "davs", "https"], "LAN reads restricted to davs; WAN unrestricted")

    def test_rucio_resolves_replicas_itself(self) -> None:
        plan = self.plan(job(), queue(acopytools={"pr": ["rucio"]}))
        self.assertEqual(
            [(x.tool, x.remote) for x in plan.transfers[0].attempts], [("rucio", "mc.data:a.root")]
        )

    def test_direct_access(self) -> None:
        plan = self.plan(job(transferType="direct"), queue())
        self.assertEqual(plan.transfers, [])
        self.assertEqual(plan.direct[0].turl, f"root://xrd.site:1094//data/{rucio_path('mc.data', 'a.root')}")
        self.assertEqual(plan.direct[0].guid, "g1")
        tarball = self.plan(job(transferType="direct", inFiles="a.tar.gz,b.root"), queue())
        self.assertEqual([t.lfn for t in tarball.transfers], ["a.tar.gz"], "archives are always copied")
        lan = self.plan(job(), queue(direct_access_lan=True))
        self.assertEqual(len(lan.direct), 2)

    def test_unknown_tool_and_no_way(self) -> None:
        error = self.assertRaises(PilotError, self.plan, job(), queue(acopytools={"pr": ["teleport"]}))
        self.assertEqual(error.code, ErrorCode.UNKNOWNCOPYTOOL)
        error = self.assertRaises(PilotError, self.plan, job(), queue(acopytools={"pr": ["s3"]}))
        self.assertEqual(error.code, ErrorCode.NOSTORAGEPROTOCOL)
        bare = queue(astorages={})
        error = self.assertRaises(PilotError, self.plan, job(ddmEndPointIn="NOWHERE,NOWHERE"), bare)
        self.assertEqual(error.code, ErrorCode.NOSTORAGE)

    def test_hostile_scope_rejected_before_any_transfer(self) -> None:
        error = self.assertRaises(JobDefinitionError, job, scopeIn="../../etc,ok")
        self.assertEqual((error.code, error.field), (ErrorCode.CONVERSIONFAILURE, "scopeIn[0]"))
        # the plan still refuses to build a path from a scope that escapes
        parsed = job()
        hostile = replace(parsed, inputs=(replace(parsed.inputs[0], scope="../../etc"),))
        error = self.assertRaises(PilotError, self.plan, hostile, queue())
        self.assertEqual(error.code, ErrorCode.STAGEINFAILED)

    def test_catalog(self) -> None:
        text = render_catalog([("g<1>", "a.root", "root://h//p?x=1&y=2")])
        self.assertIn('<File ID="g&lt;1&gt;">', text)
        self.assertIn('name="root://h//p?x=1&amp;y=2"', text)


class StageOutPlanTests(SynchronousTestCase):
    def files(self, j: Any) -> list[tuple[OutputFile, Path, Checksum, int]]:
        return [
            (spec, Path(f"/work/{spec.lfn}"), Checksum("adler32", "0000000a"), 10)
            for spec in (*j.outputs, j.log)
        ]

    def plan(self, j: Any, queuedata: QueueData) -> Any:
        storage = StorageData.from_document(STORAGE)
        return plan_stage_out(j, self.files(j), queuedata, storage, CopytoolRegistry())

    def test_destinations(self) -> None:
        out, log = self.plan(job(), queue())
        self.assertEqual([(a.tool, a.endpoint) for a in out.attempts], [("gfal", "SITE_DISK")])
        self.assertEqual(
            out.attempts[0].remote, f"root://xrd.site:1094//data/{rucio_path('mc.out', 'out.root')}"
        )
        self.assertEqual((log.activity, log.is_log, log.guid), ("pl", True, "L"))
        self.assertEqual(log.attempts[0].tool, "xrdcp")
        self.assertEqual(out.token, "ATLASDATADISK")

    def test_alternative_stage_out(self) -> None:
        (out, _log) = self.plan(job(altStageOut="on"), queue())
        self.assertEqual([a.endpoint for a in out.attempts], ["SITE_DISK", "OTHER_DISK"])
        (out, _log) = self.plan(job(), queue(params={"allow_altstageout": True}))
        self.assertEqual([a.endpoint for a in out.attempts], ["SITE_DISK", "OTHER_DISK"])

    def test_rucio_upload_to_the_rse(self) -> None:
        out, _ = self.plan(job(), queue(acopytools={"pw": ["rucio"], "pl": ["rucio"]}))
        self.assertEqual([(a.tool, a.remote) for a in out.attempts], [("rucio", "SITE_DISK")])

    def test_configured(self) -> None:
        self.assertTrue(stage_out_configured(queue(), StorageData.from_document(STORAGE)))
        self.assertFalse(stage_out_configured(QueueData.default("Q"), StorageData()))
        self.assertFalse(stage_out_configured(queue(astorages={"read_lan": ["SITE_DISK"]}), StorageData()))


class ErrorClassificationTests(SynchronousTestCase):
    def test_patterns(self) -> None:
        cases = [
            (
                "[ERROR] Server responded with an error: [3011] No such file or directory",
                True,
                ErrorCode.MISSINGINPUTFILE,
                True,
            ),
            (
                "Run: [ERROR] Server responded with an error: [3010] Permission denied",
                True,
                ErrorCode.STAGEINAUTHENTICATIONFAILURE,
                False,
            ),
            ("[ERROR] Checksum error", False, ErrorCode.PUTADMISMATCH, False),
            ("write failed: No space left on device", True, ErrorCode.NOLOCALSPACE, False),
            ("write failed: No space left on device", False, ErrorCode.NOREMOTESPACE, False),
            ("Connection timed out", False, ErrorCode.STAGEOUTTIMEOUT, False),
            ("something odd", False, ErrorCode.STAGEOUTFAILED, False),
        ]
        for text, stage_in, code, missing in cases:
            error = classify(text, stage_in=stage_in)
            self.assertEqual((error.code, error.missing), (code, missing), text)
