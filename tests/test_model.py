"""The job model: real server replies, encoding quirks, and bad definitions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jsonschema
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from pilot.errorcodes import ErrorCode
from pilot.model.job import Checksum, JobDefinitionError, attempt_nr_of, panda_id_of, parse_job

DATA = Path(__file__).parent / "data"
SCHEMA = json.loads((Path(__file__).parent.parent / "interfaces" / "job-definition.schema.json").read_text())


def sample_jobs() -> dict[str, dict[str, Any]]:
    v1 = json.loads((DATA / "v1_acquire_jobs_response.json").read_text())["data"]["jobs"][0]
    legacy_json = json.loads((DATA / "legacy_getJob_response_json.json").read_text())
    text = (DATA / "legacy_getJob_response.txt").read_text().strip()
    legacy_text = {k: v[0] for k, v in parse_qs(text, keep_blank_values=True).items()}
    return {"v1": v1, "legacy_json": legacy_json, "legacy_text": legacy_text}


def base(**extra: Any) -> dict[str, Any]:
    job: dict[str, Any] = {"PandaID": 7, "transformation": "/bin/true", "attemptNr": 2}
    job.update(extra)
    return job


class SampleTests(SynchronousTestCase):
    def test_samples_parse(self) -> None:
        for name, raw in sample_jobs().items():
            job = parse_job(raw)
            self.assertEqual(job.transformation, "/bin/echo", name)
            self.assertEqual(job.job_pars, "hello from the real PanDA server")
            self.assertEqual(job.attempt_nr, 0)
            self.assertEqual(job.inputs, ())
            self.assertIsNone(job.task_id, "NULL becomes None")
            self.assertEqual(job.processing_type, "")
            self.assertEqual(job.core_count, 1)
            self.assertEqual(job.max_walltime, 3600)
            self.assertEqual([o.lfn for o in job.outputs], [raw["outFiles"].split(",")[0]])
            self.assertEqual(job.outputs[0].scope, "test")
            self.assertEqual(job.outputs[0].ddm_endpoint, "")
            assert job.log is not None
            self.assertEqual(job.log.lfn, raw["logFile"])
            self.assertEqual(job.log.guid, raw["logGUID"])
            self.assertEqual(job.log.scope, "test")
            self.assertTrue(job.log.is_log)

    def test_samples_match_the_schema(self) -> None:
        validator = jsonschema.Draft202012Validator(SCHEMA)
        jsonschema.Draft202012Validator.check_schema(SCHEMA)
        for name, raw in sample_jobs().items():
            self.assertEqual(list(validator.iter_errors(raw)), [], name)

    def test_schema_rejects_what_the_pilot_rejects(self) -> None:
        validator = jsonschema.Draft202012Validator(SCHEMA)
        for bad in (
            {"transformation": "/bin/true"},
            {"PandaID": "x", "transformation": "a"},
            {"PandaID": 1, "transformation": ""},
        ):
            self.assertFalse(validator.is_valid(bad), bad)

    def test_schema_states_the_definition_rules(self) -> None:
        """The pilot's definition rules as the schema writes them: the same verdicts."""
        validator = jsonschema.Draft202012Validator(SCHEMA)
        bad: list[dict[str, Any]] = [
            base(outFiles="a.root,data#1.root"),
            base(inFiles="a b.root"),
            base(logFile="log?.tgz"),
            base(jobPars="-c \x00"),
            base(jobPars="x" * 122_880),
            base(transformation="/" + "t" * 4096),
            base(scopeOut="ok,bad/scope"),
            base(scopeIn="a..b"),
            base(scopeLog="-x"),
            base(preprocess={"command": {"a": 1}}),
            base(postprocess={"command": "c", "args": ["x", {"b": 1}]}),
            base(coprocess={"command": "c", "checksum": "crc:1"}),
            base(secrets={"k": {"v": 1}}),
            base(userProxy={"pem": "x"}),
        ]
        for raw in bad:
            self.assertFalse(validator.is_valid(raw), raw)
            self.assertRaises(JobDefinitionError, parse_job, raw)
        good: list[dict[str, Any]] = [
            base(
                outFiles="EVNT.1._000001.pool.root.1,log.tgz",
                scopeOut="mc16_13TeV, NULL",
                scopeLog="user.jdoe",
            ),
            base(
                preprocess={
                    "command": "https://h/p",
                    "args": ["-x"],
                    "ignore_failure": "True",
                    "checksum": "ad:1",
                }
            ),
            base(secrets={"S3_KEY": "v"}, jobPars="--containerImage docker://alpine -c 'echo hi'"),
        ]
        for raw in good:
            self.assertEqual(list(validator.iter_errors(raw)), [], raw)
            parse_job(raw)


class FieldTests(SynchronousTestCase):
    def test_inputs_and_checksums(self) -> None:
        job = parse_job(
            base(
                inFiles="a.root,NULL,b.root,a.root,c.root",
                GUID="g1,,g2,g1,g3",
                fsize="10,,20,10,30",
                checksum="ad:0a1b2c3d,,md:0123456789abcdef0123456789ABCDEF,ad:0a1b2c3d,1b2c3d",
                scopeIn="s1,,s2,s1,s3",
                ddmEndPointIn="E1,,E2,E1,E3",
            )
        )
        self.assertEqual([f.lfn for f in job.inputs], ["a.root", "b.root", "c.root"])
        a, b, c = job.inputs
        self.assertEqual((a.guid, a.size, a.scope, a.ddm_endpoint), ("g1", 10, "s1", "E1"))
        self.assertEqual(a.checksum, Checksum("adler32", "0a1b2c3d"))
        self.assertEqual(b.checksum, Checksum("md5", "0123456789abcdef0123456789abcdef"))
        self.assertEqual(c.checksum, Checksum("adler32", "001b2c3d"), "bare hex is adler32, zero-padded")
        self.assertEqual(c.checksum.report_key if c.checksum else None, "adler32")

    def test_flags_and_secrets(self) -> None:
        job = parse_job(base(debug="True", eventService="False", secrets='{"k": "v"}', pilotSecrets="x"))
        self.assertTrue(job.is_debug)
        self.assertFalse(job.flag("eventService"))
        self.assertNotIn("secrets", job.loggable())
        self.assertNotIn("pilotSecrets", job.loggable())
        self.assertIn("PandaID", job.loggable())

    def test_core_count_null_and_zero(self) -> None:
        self.assertEqual(parse_job(base(coreCount="NULL")).core_count, 1)
        self.assertEqual(parse_job(base(coreCount=0)).core_count, 1)
        self.assertEqual(parse_job(base(coreCount="8")).core_count, 8)

    def test_scope_out_for_every_output_is_accepted(self) -> None:
        job = parse_job(base(outFiles="o.root,log.tgz", scopeOut="s,s", logFile="log.tgz", scopeLog="L"))
        self.assertEqual(job.outputs[0].scope, "s")
        assert job.log is not None
        self.assertEqual(job.log.scope, "L")


class BadDefinitionTests(SynchronousTestCase):
    def assertRejected(self, raw: Any, code: ErrorCode, field: str) -> JobDefinitionError:
        error: JobDefinitionError = self.assertRaises(JobDefinitionError, parse_job, raw)
        self.assertEqual(error.code, code)
        self.assertEqual(error.field, field)
        self.assertIn(field, error.diag)
        self.assertLessEqual(len(error.diag), 256)
        return error

    def test_missing_panda_id(self) -> None:
        raw = base()
        del raw["PandaID"]
        self.assertRejected(raw, ErrorCode.NOTDEFINED, "PandaID")
        self.assertIsNone(panda_id_of(raw))

    def test_non_numeric_attempt(self) -> None:
        raw = base(attemptNr="abc")
        self.assertRejected(raw, ErrorCode.CONVERSIONFAILURE, "attemptNr")
        self.assertEqual(panda_id_of(raw), 7, "the job can still be reported")
        self.assertIsNone(attempt_nr_of(raw))

    def test_mismatched_lists(self) -> None:
        self.assertRejected(base(inFiles="a,b", GUID="1,2,3"), ErrorCode.NOTSAMELENGTH, "GUID")
        self.assertRejected(
            base(outFiles="a,b,log.tgz", logFile="log.tgz", scopeOut="s,s,s,s"),
            ErrorCode.NOTSAMELENGTH,
            "scopeOut",
        )
        self.assertRejected(
            base(outFiles="a,b", destinationDblock="d"), ErrorCode.NOTSAMELENGTH, "destinationDblock"
        )

    def test_bad_checksum(self) -> None:
        self.assertRejected(
            base(inFiles="a", checksum="zz:123"), ErrorCode.UNKNOWNCHECKSUMTYPE, "checksum[0]"
        )
        self.assertRejected(
            base(inFiles="a", checksum="ad:xyz"), ErrorCode.UNKNOWNCHECKSUMTYPE, "checksum[0]"
        )

    def test_hostile_file_names(self) -> None:
        for lfn in ("../../etc/passwd", "/etc/passwd", "-rf", "..", ".", "a\x00b", "a\nb", "x/y"):
            self.assertRejected(base(inFiles=lfn), ErrorCode.STAGEINFAILED, "inFiles[0]")
            self.assertRejected(base(outFiles=lfn), ErrorCode.BADOUTPUTFILENAME, "outFiles[0]")
            self.assertRejected(base(logFile=lfn, outFiles=lfn), ErrorCode.BADOUTPUTFILENAME, "logFile")
        self.assertRejected(base(outFiles="a" * 256), ErrorCode.LFNTOOLONG, "outFiles[0]")

    def test_missing_transformation_and_garbage(self) -> None:
        self.assertRejected({"PandaID": 1}, ErrorCode.NOTDEFINED, "transformation")
        self.assertRejected({"PandaID": -3, "transformation": "x"}, ErrorCode.CONVERSIONFAILURE, "PandaID")
        self.assertRejected(base(fsize="a", inFiles="f"), ErrorCode.CONVERSIONFAILURE, "fsize[0]")
        self.assertRejected(["not", "a", "dict"], ErrorCode.CONVERSIONFAILURE, "<job>")
        self.assertIsNone(panda_id_of("garbage"))

    def test_url_special_characters_in_file_names(self) -> None:
        """Defect 7: ``data#1.root`` was reported with that name while storage held ``data``."""
        for lfn in ("data#1.root", "data?x=1", "a%20b.root", "a b.root", "a\udc80b"):
            self.assertRejected(base(outFiles=lfn), ErrorCode.BADOUTPUTFILENAME, "outFiles[0]")
            self.assertRejected(base(logFile=lfn, outFiles=lfn), ErrorCode.BADOUTPUTFILENAME, "logFile")
            self.assertRejected(base(inFiles=f"ok.root,{lfn}"), ErrorCode.STAGEINFAILED, "inFiles[1]")
        for lfn in ("EVNT.123._000001.pool.root.1", "a+b=c:d@e.root", "user.jdoe_1-2.tgz"):
            self.assertEqual(parse_job(base(outFiles=lfn)).outputs[0].lfn, lfn)

    def test_nul_and_lone_surrogates_are_definition_errors(self) -> None:
        """Defect 8: they failed the payload's start (1305) instead of the definition."""
        for bad in ("a\x00b", "a\udc80b", "\ud800"):
            for key in ("jobPars", "transformation", "container_name", "cmtConfig", "swRelease"):
                self.assertRejected(base(**{key: bad}), ErrorCode.CONVERSIONFAILURE, key)
            for key in ("GUID", "realDatasetsIn", "prodDBlockToken", "ddmEndPointIn"):
                self.assertRejected(
                    base(inFiles="a,b", **{key: f"x,{bad}"}), ErrorCode.CONVERSIONFAILURE, f"{key}[1]"
                )
            self.assertRejected(
                base(preprocess={"command": "run", "args": bad}),
                ErrorCode.CONVERSIONFAILURE,
                "preprocess.args",
            )
            self.assertRejected(base(logFile="l.tgz", logGUID=bad), ErrorCode.CONVERSIONFAILURE, "logGUID")
        error = self.assertRejected(base(jobPars="-c 'echo \x00'"), ErrorCode.CONVERSIONFAILURE, "jobPars")
        self.assertIn("NUL", error.diag)

    def test_steps_have_their_documented_shape(self) -> None:
        """Defect 8: nested JSON in a step ended in UNKNOWNEXCEPTION (1301) when the job ran."""
        cases: list[tuple[Any, str]] = [
            ({"command": {"a": 1}}, "preprocess.command"),
            ({"command": ""}, "preprocess.command"),
            ({"args": "x"}, "preprocess.command"),
            ({"command": "c", "args": ["x", {"b": 1}]}, "preprocess.args[1]"),
            ({"command": "c", "args": {"b": 1}}, "preprocess.args"),
            ({"command": "c", "ignore_failure": {"b": 1}}, "preprocess.ignore_failure"),
            (["c"], "preprocess"),
            ("{bad", "preprocess"),
            ("[" * 100_000, "preprocess"),
            (json.dumps({"command": {"a": 1}}), "preprocess.command"),
        ]
        for value, field in cases:
            self.assertRejected(base(preprocess=value), ErrorCode.CONVERSIONFAILURE, field)
        self.assertRejected(
            base(postprocess={"command": "c", "checksum": "crc:1"}),
            ErrorCode.UNKNOWNCHECKSUMTYPE,
            "postprocess.checksum",
        )
        job = parse_job(
            base(
                preprocess={"command": "a", "args": ["x", "y"]},
                coprocess="NULL",
                postprocess=json.dumps(
                    {"command": "https://h/p", "ignore_failure": "True", "checksum": "ad:1"}
                ),
            )
        )
        self.assertEqual(sorted(job.steps), ["postprocess", "preprocess"])
        self.assertEqual((job.steps["preprocess"].command, job.steps["preprocess"].args), ("a", "x y"))
        post = job.steps["postprocess"]
        self.assertEqual((post.is_url, post.ignore_failure, post.checksum), (True, True, "ad:1"))

    def test_secrets_are_an_object_of_strings(self) -> None:
        """Defect 8: secrets of another shape failed the job only when its payload was set up."""
        for value in (
            ["p4ssw0rd"],
            {"k": {"v": "p4ssw0rd"}},
            '["p4ssw0rd"]',
            "{p4ssw0rd",
            {"k": 1},
            "[" * 50_000,
        ):
            error = self.assertRejected(base(secrets=value), ErrorCode.CONVERSIONFAILURE, "secrets")
            self.assertNotIn("p4ssw0rd", error.diag, "a secret is never quoted")
        job = parse_job(base(secrets='{"S3_KEY": "p4ssw0rd"}'))
        self.assertEqual(job.secrets, {"S3_KEY": "p4ssw0rd"})
        self.assertNotIn("p4ssw0rd", repr(job))
        self.assertEqual(parse_job(base(secrets={"k": "v"})).secrets, {"k": "v"})
        self.assertEqual(parse_job(base(secrets="NULL")).secrets, {})
        self.assertRejected(base(userProxy={"pem": "x"}), ErrorCode.CONVERSIONFAILURE, "userProxy")

    def test_scopes_are_checked_before_the_payload_runs(self) -> None:
        """Defect 8: a bad output scope was found at stage-out, after the payload (holding, 1137)."""
        outputs = {"outFiles": "a.root,log.tgz", "logFile": "log.tgz"}
        self.assertRejected(base(scopeOut="bad/scope", **outputs), ErrorCode.CONVERSIONFAILURE, "scopeOut[0]")
        self.assertRejected(base(scopeOut="ok,..", **outputs), ErrorCode.CONVERSIONFAILURE, "scopeOut[1]")
        self.assertRejected(base(scopeLog="-x", **outputs), ErrorCode.CONVERSIONFAILURE, "scopeLog")
        self.assertRejected(base(inFiles="a", scopeIn=".hidden"), ErrorCode.CONVERSIONFAILURE, "scopeIn[0]")
        job = parse_job(base(scopeOut="mc16_13TeV", scopeLog="user.jdoe", **outputs))
        self.assertEqual(job.outputs[0].scope, "mc16_13TeV")

    def test_nested_values_in_file_lists(self) -> None:
        self.assertRejected(base(inFiles=["a", {"x": 1}]), ErrorCode.CONVERSIONFAILURE, "inFiles[1]")

    @settings(deadline=None, max_examples=200)
    @given(
        st.dictionaries(
            st.sampled_from(
                [
                    "inFiles",
                    "GUID",
                    "fsize",
                    "checksum",
                    "outFiles",
                    "scopeOut",
                    "logFile",
                    "attemptNr",
                    "coreCount",
                    "maxWalltime",
                    "jobPars",
                    "taskID",
                    "ddmEndPointOut",
                    "debug",
                    "scopeIn",
                    "container_name",
                    "preprocess",
                    "secrets",
                ]
            ),
            st.one_of(
                st.text(max_size=40),
                st.integers(),
                st.none(),
                st.booleans(),
                st.sampled_from(["\x00", "\udc80", "--containerImage /", '{"command": []}', "[1]"]),
            ),
        )
    )
    def test_anything_parses_or_is_rejected_cleanly(self, extra: dict[str, Any]) -> None:
        raw = base(**extra)
        try:
            parse_job(raw)
        except JobDefinitionError as error:
            self.assertLessEqual(len(error.diag), 256)
