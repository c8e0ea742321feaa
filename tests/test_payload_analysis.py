"""How a finished payload's exit status, output tails and jobReport.json become update fields."""

from __future__ import annotations

import copy
import json
import re
import signal
from pathlib import Path
from typing import Any

import jsonschema
from twisted.trial.unittest import SynchronousTestCase

from pilot.errorcodes import ErrorCode
from pilot.errors import MAX_DIAG_LENGTH, error_for_signal
from pilot.monitor.payload_analysis import (
    MAX_JOB_REPORT_BYTES,
    MAX_META_DATA_BYTES,
    STDERR_PATTERNS,
    PayloadAnalysis,
    StderrPattern,
    analyse_payload,
    classify_stderr,
    read_tail,
)

SCHEMA = json.loads(
    (Path(__file__).parent.parent / "interfaces" / "job-report.schema.json").read_text(encoding="utf-8")
)

#: A successful two-step ATLAS reconstruction (HITS → RDO → AOD, plus a DAOD of the same
#: events), shaped like PyJobTransforms' report v2: far more than the pilot reads.
ATLAS_REPORT: dict[str, Any] = {
    "reportVersion": "2.0.9",
    "name": "Reco_tf",
    "cmdLine": "'/cvmfs/atlas.cern.ch/repo/sw/software/24.0/Athena/InstallArea/bin/Reco_tf.py' "
    "'--inputHITSFile=HITS.38191712._000123.pool.root.1' '--outputAODFile=AOD.38191745._000042.pool.root.1' "
    "'--maxEvents=2000' '--multithreaded=True'",
    "created": "2026-03-12T10:22:31",
    "exitAcronym": "OK",
    "exitCode": 0,
    "exitMsg": "OK",
    "exitMsgExtra": "",
    "executor": [
        {
            "name": "HITtoRDO",
            "rc": 0,
            "statusOK": True,
            "validation": True,
            "errMsg": "",
            "exeConfig": {
                "inputs": ["HITS"],
                "outputs": ["RDO_TEMP"],
                "script": "athena.py",
                "substep": "h2r",
            },
            "logfileReport": {
                "countSummary": {"CATASTROPHE": 0, "CRITICAL": 0, "ERROR": 0, "FATAL": 0, "WARNING": 112},
                "details": {},
            },
            "metaData": {},
            "asetup": None,
        },
        {
            "name": "RDOtoAOD",
            "rc": 0,
            "statusOK": True,
            "validation": True,
            "errMsg": "",
            "exeConfig": {
                "inputs": ["RDO_TEMP"],
                "outputs": ["AOD"],
                "script": "athena.py",
                "substep": "r2a",
            },
            "logfileReport": {
                "countSummary": {"CATASTROPHE": 0, "CRITICAL": 0, "ERROR": 3, "FATAL": 0, "WARNING": 407},
                "details": {},
            },
            "metaData": {},
            "asetup": None,
        },
    ],
    "files": {
        "input": [
            {
                "type": "HITS",
                "dataset": None,
                "subFiles": [
                    {
                        "name": "HITS.38191712._000123.pool.root.1",
                        "file_guid": "4A4F0E2D-93C4-0E4B-9D0C-3B6A0A4A5C11",
                        "nentries": 2000,
                    }
                ],
            }
        ],
        "output": [
            {
                "type": "AOD",
                "argName": "outputAODFile",
                "dataset": None,
                "subFiles": [
                    {
                        "name": "AOD.38191745._000042.pool.root.1",
                        "file_guid": "8B0F2E6C-1D2A-4E5F-9A7B-6C5D4E3F2A1B",
                        "file_size": 412388112,
                        "nentries": 1200,
                        "integrity": True,
                        "beam_type": ["collisions"],
                        "conditions_tag": "OFLCOND-MC21-SDR-RUN3-07",
                        "geometry": "ATLAS-R3S-2021-03-02-00",
                    },
                    {
                        "name": "AOD.38191745._000043.pool.root.1",
                        "file_guid": "0C3D9B1E-7F6A-4B2C-8D1E-2F3A4B5C6D7E",
                        "file_size": 273519880,
                        "nentries": 800,
                        "integrity": True,
                    },
                ],
            },
            {
                "type": "DAOD_PHYS",
                "argName": "outputDAOD_PHYSFile",
                "dataset": None,
                "subFiles": [
                    {
                        "name": "DAOD_PHYS.38191746._000042.pool.root.1",
                        "file_guid": "1E2D3C4B-5A69-4788-9766-554433221100",
                        "file_size": 51200331,
                        "nentries": 2000,
                        "integrity": True,
                    }
                ],
            },
        ],
        "temporary": [
            {"type": "RDO_TEMP", "subFiles": [{"name": "tmp.RDO", "nentries": 2000, "file_size": None}]}
        ],
    },
    "resource": {
        "executor": {
            "HITtoRDO": {
                "cpuTime": 5312,
                "cpuTimePerWorker": 664,
                "dbDataTotal": 2516582,
                "dbTimeTotal": 14.2,
                "nevents": 2000,
                "wallTime": 1030,
                "mpworkers": 8,
                "memory": {"Avg": {"avgPSS": 5120344}, "Max": {"maxPSS": 7340032}},
                "preExe": {"cpuTime": 2, "wallTime": 6},
                "postExe": {"cpuTime": 1, "wallTime": 3},
                "validation": {"cpuTime": 0, "wallTime": 1},
                "total": {"cpuTime": 5315, "wallTime": 1040},
            },
            "RDOtoAOD": {
                "cpuTime": 9750.4,
                "nevents": 2000,
                "wallTime": 1645.25,
                "mpworkers": 8,
            },
        },
        "transform": {
            "cpuEfficiency": 0.7043,
            "cpuPWEfficiency": 0.8312,
            "cpuTime": 15070,
            "cpuTimeTotal": 15085,
            "externalCpuTime": 15,
            "processedEvents": 2000,
            "trfPredata": None,
            "wallTime": 2692,
        },
        "machine": {"cpu_family": "25", "model_name": "AMD EPYC 7763 64-Core Processor", "node": "wn0421"},
        "dbDataTotal": 2516582,
        "dbTimeTotal": 14.2,
    },
}

#: A transform that failed its output validation (ATLAS exit 66), as its report says it.
FAILED_REPORT: dict[str, Any] = {
    "reportVersion": "2.0.9",
    "name": "Derivation_tf",
    "exitAcronym": "TRF_EXEC_VALIDATION_FAIL",
    "exitCode": 66,
    "exitMsg": "Validation of return code failed: Non-zero return code from AODtoDAOD (8) (Error code 66)",
    "files": {"input": [], "output": []},
    "resource": {"executor": {"AODtoDAOD": {"cpuTime": 120, "wallTime": 341, "nevents": 0}}},
}

#: One realistic line for every entry of STDERR_PATTERNS, with the code it must give.
SAMPLE_LINES: tuple[tuple[str, ErrorCode], ...] = (
    (
        "WARNING: Not mounting requested bind point (already mounted in container): /srv",
        ErrorCode.SINGULARITYBINDPOINTFAILURE,
    ),
    (
        "ERROR  : No more available loop devices, try increasing 'max loop devices' in singularity.conf",
        ErrorCode.SINGULARITYNOLOOPDEVICES,
    ),
    (
        "FATAL:   container creation failed: mount /proc/self/fd/3->/var/apptainer/mnt/session/rootfs "
        "error: while mounting image /proc/self/fd/3: failed to find loop device",
        ErrorCode.SINGULARITYIMAGEMOUNTFAILURE,
    ),
    (
        "FATAL:   Failed invoking the NEWUSER namespace runtime: Invalid argument",
        ErrorCode.SINGULARITYNEWUSERNAMESPACE,
    ),
    (
        "FATAL:   Failed to create user namespace: user namespace disabled",
        ErrorCode.SINGULARITYFAILEDUSERNAMESPACE,
    ),
    ("Singularity is not installed on this node", ErrorCode.SINGULARITYNOTINSTALLED),
    ("Apptainer is not installed on this node", ErrorCode.APPTAINERNOTINSTALLED),
    (
        "FATAL:   container creation failed: mount overlay->/var/apptainer/mnt/session/final "
        "error: operation not permitted",
        ErrorCode.SINGULARITYGENERALFAILURE,
    ),
    (
        "FATAL:   container creation failed: fork: resource temporarily unavailable",
        ErrorCode.SINGULARITYRESOURCEUNAVAILABLE,
    ),
    ("OSError: [Errno 28] No space left on device: 'AOD.pool.root'", ErrorCode.NOLOCALSPACE),
    ("terminate called after throwing an instance of 'std::bad_alloc'", ErrorCode.PAYLOADOUTOFMEMORY),
    (
        "sh: /cvmfs/atlas.cern.ch/repo/ATLASLocalRootBase/user/atlasLocalSetup.sh: No such file or directory",
        ErrorCode.MISSINGINSTALLATION,
    ),
    ("AtlasSetup(FATAL): Fatal exception: release 24.0.99 not found", ErrorCode.SETUPFATAL),
    ("ERROR: unable to fetch source tarball from web", ErrorCode.MISSINGUSERCODE),
    ("SL5 is unsupported", ErrorCode.UNSUPPORTEDSL5OS),
    ("Reco_tf.py: error: unrecognized arguments: --bogusOption=1", ErrorCode.UNRECOGNIZEDTRFARGUMENTS),
    ("bash: line 1: Reco_tf.py: command not found", ErrorCode.TRANSFORMNOTFOUND),
    ("Error SQLiteStatement::prepare 5 database is locked", ErrorCode.NFSSQLITE),
    (
        "/bin/bash: line 1: 4242 Segmentation fault      (core dumped) athena.py jobOptions.py",
        error_for_signal(signal.SIGSEGV),
    ),
    ("bash: fork: retry: Resource temporarily unavailable", ErrorCode.RESOURCEUNAVAILABLE),
)


class ScratchMixin:
    """A fresh work directory per test, and writers for the payload's files."""

    mktemp: Any

    def workdir(self) -> Path:
        path = Path(self.mktemp())
        path.mkdir()
        return path

    def write_report(self, workdir: Path, report: object) -> None:
        (workdir / "jobReport.json").write_text(json.dumps(report), encoding="utf-8")


class JobReportTests(ScratchMixin, SynchronousTestCase):
    def test_report_matches_the_schema(self) -> None:
        jsonschema.Draft202012Validator.check_schema(SCHEMA)
        validator = jsonschema.Draft202012Validator(SCHEMA)
        for report in (ATLAS_REPORT, FAILED_REPORT, {}):
            self.assertEqual(list(validator.iter_errors(report)), [])

    def test_schema_rejects_what_the_pilot_ignores(self) -> None:
        validator = jsonschema.Draft202012Validator(SCHEMA)
        bad_nentries = copy.deepcopy(ATLAS_REPORT)
        bad_nentries["files"]["output"][0]["subFiles"][0]["nentries"] = -1
        bad_cpu = copy.deepcopy(ATLAS_REPORT)
        bad_cpu["resource"]["executor"]["HITtoRDO"]["cpuTime"] = "fast"
        bad: object
        for bad in ([], {"exitCode": "0"}, {"exitMsg": 1}, bad_nentries, bad_cpu):
            self.assertFalse(validator.is_valid(bad), bad)

    def test_successful_atlas_report(self) -> None:
        workdir = self.workdir()
        self.write_report(workdir, ATLAS_REPORT)
        result = analyse_payload(0, None, workdir)
        self.assertEqual(result.exe_error_code, 0)
        self.assertEqual(result.exe_error_diag, "OK")
        self.assertIsNone(result.pilot_error)
        # 1200 + 800 AOD events and the same 2000 in the DAOD: 2000, not 4000.
        self.assertEqual(result.n_events, 2000)
        self.assertEqual(
            result.job_metrics, {"nEvents": "2000", "trfCpuTime": "15062", "trfWallTime": "2675"}
        )
        assert result.meta_data is not None
        summary = {"files": ATLAS_REPORT["files"], "resource": ATLAS_REPORT["resource"]}
        self.assertEqual(result.meta_data, json.dumps(summary, separators=(",", ":")))

    def test_failed_report_wins_over_the_exit_status(self) -> None:
        workdir = self.workdir()
        self.write_report(workdir, FAILED_REPORT)
        (workdir / "payload.stderr").write_text("ERROR: something less precise\n")
        result = analyse_payload(1, None, workdir)
        self.assertEqual(result.exe_error_code, 66)
        self.assertEqual(result.exe_error_diag, FAILED_REPORT["exitMsg"])
        self.assertIsNone(result.pilot_error, "the exit status alone is the caller's to judge")
        self.assertEqual(result.n_events, 0)

    def test_acronym_when_there_is_no_message(self) -> None:
        workdir = self.workdir()
        self.write_report(workdir, {"exitCode": 65, "exitAcronym": "TRF_EXEC_FAIL"})
        result = analyse_payload(65, None, workdir)
        self.assertEqual((result.exe_error_code, result.exe_error_diag), (65, "TRF_EXEC_FAIL"))

    def test_report_sigsegv_and_bad_alloc(self) -> None:
        for message, code in (
            ("Athena got a SIGSEGV signal (Segmentation fault)", ErrorCode.PAYLOADSIGSEGV),
            ("std::bad_alloc in RDOtoAOD", ErrorCode.BADALLOC),
        ):
            workdir = self.workdir()
            self.write_report(workdir, {"exitCode": 65, "exitMsg": message})
            (workdir / "payload.stderr").write_text("Segmentation fault (core dumped)\n")
            result = analyse_payload(65, None, workdir)
            assert result.pilot_error is not None
            self.assertEqual(result.pilot_error[0], code)
            self.assertEqual(result.exe_error_diag, message)

    def test_zero_exit_with_a_failed_report(self) -> None:
        workdir = self.workdir()
        self.write_report(workdir, {"exitCode": 68, "exitMsg": "output file validation failed"})
        result = analyse_payload(0, None, workdir)
        self.assertEqual(result.exe_error_code, 68)
        assert result.pilot_error is not None
        self.assertEqual(result.pilot_error[0], ErrorCode.UNKNOWNPAYLOADFAILURE)
        self.assertIn("68 output file validation failed", result.pilot_error[1])

    def test_event_count_fallbacks(self) -> None:
        no_nentries = copy.deepcopy(ATLAS_REPORT)
        for output in no_nentries["files"]["output"]:
            for sub in output["subFiles"]:
                sub["nentries"] = None
        no_nentries["resource"]["executor"]["RDOtoAOD"]["nevents"] = 1999
        for report, expected in (
            (no_nentries, 2000),
            ({"nEvents": 77, "resource": {"executor": {"x": {"cpuTime": 3}}}}, 77),
            ({"nEvents": -4, "files": {"output": "none"}}, None),
            ({"nEvents": True}, None),
            ({"files": {"output": [{"subFiles": [{"nentries": 5}, {"nentries": "6"}, 7]}]}}, 5),
        ):
            workdir = self.workdir()
            self.write_report(workdir, report)
            result = analyse_payload(0, None, workdir)
            self.assertEqual(result.n_events, expected, report)
            self.assertEqual(result.job_metrics.get("nEvents"), None if expected is None else str(expected))

    def test_wrongly_typed_fields_are_ignored(self) -> None:
        workdir = self.workdir()
        self.write_report(
            workdir, {"exitCode": "0", "exitMsg": ["OK"], "files": [], "resource": {"executor": [1]}}
        )
        result = analyse_payload(3, None, workdir)
        self.assertEqual(result.exe_error_code, 3, "a string exitCode is not the report's")
        self.assertEqual(result.meta_data, '{"resource":{"executor":[1]}}')
        self.assertEqual(result.job_metrics, {})
        workdir = self.workdir()
        self.write_report(workdir, {"exitCode": True})
        self.assertEqual(analyse_payload(0, None, workdir).exe_error_code, 0)

    def test_big_metadata_is_dropped_but_counted(self) -> None:
        report = copy.deepcopy(ATLAS_REPORT)
        report["files"]["output"][0]["subFiles"] += [
            {"name": f"AOD.38191745._{n:06d}.pool.root.1", "nentries": 0, "file_guid": "0" * 36}
            for n in range(2000)
        ]
        workdir = self.workdir()
        self.write_report(workdir, report)
        self.assertGreater((workdir / "jobReport.json").stat().st_size, MAX_META_DATA_BYTES)
        result = analyse_payload(0, None, workdir)
        self.assertIsNone(result.meta_data)
        self.assertEqual(result.n_events, 2000)
        self.assertEqual(result.exe_error_diag, "OK")


class MalformedReportTests(ScratchMixin, SynchronousTestCase):
    def analyse_raw(self, content: bytes, exit_code: int = 0, stderr: str = "") -> PayloadAnalysis:
        workdir = self.workdir()
        (workdir / "jobReport.json").write_bytes(content)
        (workdir / "payload.stderr").write_text(stderr)
        return analyse_payload(exit_code, None, workdir)

    def assertIgnored(self, result: PayloadAnalysis, reason: str) -> None:
        self.assertIsNone(result.meta_data)
        self.assertIsNone(result.n_events)
        self.assertEqual(result.exe_error_code, 0)
        assert result.exe_error_diag is not None
        self.assertIn("jobReport.json", result.exe_error_diag)
        self.assertIn(reason, result.exe_error_diag)
        self.assertLessEqual(len(result.exe_error_diag), MAX_DIAG_LENGTH)

    def test_not_json(self) -> None:
        self.assertIgnored(self.analyse_raw(b'{"exitCode": 0, "files": {'), "not valid JSON")
        self.assertIgnored(self.analyse_raw(b""), "not valid JSON")
        self.assertIgnored(self.analyse_raw(b'{"exitCode": NaN}'), "not valid JSON")
        self.assertIgnored(self.analyse_raw(b"[" * 200_000 + b"]" * 200_000), "not valid JSON")
        self.assertIgnored(self.analyse_raw(b'{"exitCode": ' + b"9" * 5000 + b"}"), "not valid JSON")

    def test_not_utf8(self) -> None:
        result = self.analyse_raw(b'{"exitCode": 0, "exitMsg": "caf\xe9 \xff"}')
        self.assertIgnored(result, "not UTF-8")

    def test_not_an_object(self) -> None:
        for content in (b"[1, 2]", b'"OK"', b"null", b"0"):
            self.assertIgnored(self.analyse_raw(content), "not a JSON object")

    def test_huge(self) -> None:
        padding = b"x" * (MAX_JOB_REPORT_BYTES + 1)
        self.assertIgnored(self.analyse_raw(b'{"exitCode": 0, "pad": "' + padding + b'"}'), "larger than")

    def test_note_only_when_nothing_else_is_known(self) -> None:
        result = self.analyse_raw(b"{", exit_code=2, stderr="ERROR: input file is corrupt\n")
        self.assertEqual(result.exe_error_code, 2)
        self.assertEqual(result.exe_error_diag, "ERROR: input file is corrupt")

    def test_utf8_bom_is_accepted(self) -> None:
        result = self.analyse_raw(b'\xef\xbb\xbf{"exitCode": 0, "exitMsg": "OK"}')
        self.assertEqual(result.exe_error_diag, "OK")

    def test_unreadable(self) -> None:
        workdir = self.workdir()
        (workdir / "jobReport.json").mkdir()
        result = analyse_payload(0, None, workdir)
        assert result.exe_error_diag is not None
        self.assertIn("unreadable", result.exe_error_diag)


class PatternTests(SynchronousTestCase):
    def test_every_pattern(self) -> None:
        self.assertEqual(len(SAMPLE_LINES), len(STDERR_PATTERNS), "one sample per pattern")
        for (line, code), (regex, table_code, short) in zip(SAMPLE_LINES, STDERR_PATTERNS, strict=True):
            self.assertEqual(code, table_code, line)
            self.assertIsNotNone(regex.search(line), line)
            text = f"Py:Athena INFO starting\n{line}\nPy:Athena INFO leaving\n"
            found = classify_stderr(text)
            assert found is not None, line
            self.assertEqual(found[0], code, line)
            self.assertTrue(found[1] == short or found[1].startswith(f"{short}: "), found)
            self.assertIn(" ".join(line.split())[:100], found[1])

    def test_segfault_uses_the_signal_code(self) -> None:
        self.assertEqual(error_for_signal(signal.SIGSEGV), ErrorCode.SIGSEGV)
        found = classify_stderr("Segmentation fault\n")
        self.assertEqual(found, (ErrorCode.SIGSEGV, "segmentation fault: Segmentation fault"))

    def test_out_of_memory_variants(self) -> None:
        for line in (
            "AthenaHiveEventLoopMgr FATAL out of memory",
            "std::bad_alloc",
            "what(): St9bad_alloc",
            "Traceback (most recent call last):\nMemoryError",
            "Out of memory: Killed process 4242 (athena.py)",
        ):
            found = classify_stderr(line)
            assert found is not None, line
            self.assertEqual(found[0], ErrorCode.PAYLOADOUTOFMEMORY, line)

    def test_generic_errno_texts_are_not_blamed_on_the_container(self) -> None:
        self.assertIsNone(classify_stderr("chmod: changing permissions of 'x': Operation not permitted"))
        self.assertEqual(
            classify_stderr("bash: fork: Resource temporarily unavailable"),
            (
                ErrorCode.RESOURCEUNAVAILABLE,
                "resource temporarily unavailable: bash: fork: Resource temporarily unavailable",
            ),
        )

    def test_cause_outranks_consequence(self) -> None:
        text = "Segmentation fault\nstd::bad_alloc\nReco_tf.py: command not found\n"
        self.assertEqual(
            classify_stderr(text), (ErrorCode.PAYLOADOUTOFMEMORY, "out of memory: std::bad_alloc")
        )

    def test_nothing_known(self) -> None:
        for text in ("", "all good\n", "WARNING: deprecated option\n", "\ufffd\ufffd"):
            self.assertIsNone(classify_stderr(text))

    def test_detail_is_bounded(self) -> None:
        found = classify_stderr("No space left on device " + "x" * 10_000)
        assert found is not None
        self.assertLessEqual(len(found[1]), 200)
        self.assertTrue(found[1].endswith("..."))

    def test_plugins_extend_the_table(self) -> None:
        mine: tuple[StderrPattern, ...] = (
            (re.compile(r"Frontier server not reachable"), ErrorCode.FRONTIER, "frontier down"),
        )
        text = "Frontier server not reachable\nSegmentation fault\n"
        self.assertEqual(
            classify_stderr(text, patterns=mine + STDERR_PATTERNS),
            (ErrorCode.FRONTIER, "frontier down: Frontier server not reachable"),
        )
        self.assertEqual(classify_stderr(text), (ErrorCode.SIGSEGV, "segmentation fault: Segmentation fault"))
        workdir = Path(self.mktemp())
        workdir.mkdir()
        (workdir / "payload.stderr").write_text(text)
        result = analyse_payload(65, None, workdir, patterns=mine + STDERR_PATTERNS)
        assert result.pilot_error is not None
        self.assertEqual(result.pilot_error[0], ErrorCode.FRONTIER)


class AnalyseTests(ScratchMixin, SynchronousTestCase):
    def run_payload(
        self, exit_code: int | None, sig: int | None = None, stderr: str = "", stdout: str = ""
    ) -> PayloadAnalysis:
        workdir = self.workdir()
        if stderr:
            (workdir / "payload.stderr").write_text(stderr)
        if stdout:
            (workdir / "payload.stdout").write_text(stdout)
        return analyse_payload(exit_code, sig, workdir)

    def test_clean_exit_and_nothing_written(self) -> None:
        self.assertEqual(self.run_payload(0), PayloadAnalysis(exe_error_code=0))
        self.assertEqual(analyse_payload(None, None, Path(self.mktemp())), PayloadAnalysis())

    def test_exit_code_without_report(self) -> None:
        result = self.run_payload(
            3, stderr="INFO reading input\nERROR: cannot open input.root\nERROR: giving up\nbye\n"
        )
        self.assertEqual(result.exe_error_code, 3)
        self.assertEqual(result.exe_error_diag, "ERROR: giving up")
        self.assertIsNone(result.pilot_error)
        self.assertIsNone(result.meta_data)
        self.assertEqual(result.job_metrics, {})

    def test_diag_fallbacks(self) -> None:
        self.assertEqual(
            self.run_payload(1, stderr="WARNING: low disk\n").exe_error_diag, "WARNING: low disk"
        )
        self.assertEqual(
            self.run_payload(1, stdout="Py:Athena CRITICAL no events\nend\n").exe_error_diag,
            "Py:Athena CRITICAL no events",
        )
        self.assertEqual(self.run_payload(1, stderr="Killed\n\n").exe_error_diag, "Killed")
        self.assertIsNone(self.run_payload(1).exe_error_diag)

    def test_pattern_on_failure(self) -> None:
        result = self.run_payload(127, stderr="bash: line 1: Reco_tf.py: command not found\n")
        self.assertEqual(
            result.pilot_error,
            (ErrorCode.TRANSFORMNOTFOUND, "command not found: bash: line 1: Reco_tf.py: command not found"),
        )
        self.assertEqual(result.exe_error_diag, result.pilot_error[1] if result.pilot_error else None)
        self.assertEqual(result.exe_error_code, 127)

    def test_stdout_is_scanned_after_stderr(self) -> None:
        result = self.run_payload(
            134, stdout="terminate called after throwing an instance of 'std::bad_alloc'\n"
        )
        assert result.pilot_error is not None
        self.assertEqual(result.pilot_error[0], ErrorCode.PAYLOADOUTOFMEMORY)
        result = self.run_payload(1, stderr="No space left on device\n", stdout="std::bad_alloc\n")
        assert result.pilot_error is not None
        self.assertEqual(result.pilot_error[0], ErrorCode.NOLOCALSPACE)

    def test_zero_exit_only_container_failures_count(self) -> None:
        quiet = self.run_payload(0, stderr="which: lsetup: command not found\nSegmentation fault\n")
        self.assertIsNone(quiet.pilot_error)
        self.assertIsNone(quiet.exe_error_diag)
        failed = self.run_payload(0, stderr="FATAL:   Failed to create user namespace: not permitted\n")
        assert failed.pilot_error is not None
        self.assertEqual(failed.pilot_error[0], ErrorCode.SINGULARITYFAILEDUSERNAMESPACE)
        self.assertEqual(failed.exe_error_code, 0)
        self.assertEqual(failed.exe_error_diag, failed.pilot_error[1])

    def test_signal_gives_its_code(self) -> None:
        for sig, code in (
            (signal.SIGSEGV, ErrorCode.SIGSEGV),
            (signal.SIGTERM, ErrorCode.SIGTERM),
            (signal.SIGBUS, ErrorCode.SIGBUS),
            (signal.SIGKILL, ErrorCode.KILLSIGNAL),
        ):
            result = self.run_payload(None, sig)
            self.assertEqual(code, error_for_signal(sig))
            name = signal.Signals(sig).name
            self.assertEqual(result.pilot_error, (code, f"payload killed by signal {int(sig)} ({name})"))
            self.assertIsNone(result.exe_error_code)
            self.assertEqual(result.exe_error_diag, result.pilot_error[1] if result.pilot_error else None)
        self.assertEqual(
            self.run_payload(None, 200).pilot_error, (ErrorCode.KILLSIGNAL, "payload killed by signal 200")
        )

    def test_pattern_explains_the_signal(self) -> None:
        result = self.run_payload(
            None, signal.SIGKILL, stderr="Out of memory: Killed process 4242 (athena)\n"
        )
        assert result.pilot_error is not None
        self.assertEqual(result.pilot_error[0], ErrorCode.PAYLOADOUTOFMEMORY)

    def test_diag_is_bounded(self) -> None:
        long_line = "ERROR: " + "disk read failed; " * 100
        for result in (
            self.run_payload(1, stderr=long_line),
            self.run_payload(1, stderr="No space left on device: " + "/srv/x" * 200),
        ):
            assert result.exe_error_diag is not None
            self.assertLessEqual(len(result.exe_error_diag), MAX_DIAG_LENGTH)
        workdir = self.workdir()
        (workdir / "jobReport.json").write_text(json.dumps({"exitCode": 65, "exitMsg": "m\n" * 1000}))
        diag = analyse_payload(65, None, workdir).exe_error_diag
        assert diag is not None
        self.assertEqual(len(diag), MAX_DIAG_LENGTH)
        self.assertTrue(diag.endswith("..."))

    def test_other_file_names(self) -> None:
        workdir = self.workdir()
        (workdir / "err.txt").write_text("No space left on device\n")
        (workdir / "report.json").write_text(json.dumps({"exitCode": 65, "nEvents": 3}))
        result = analyse_payload(65, None, workdir, stderr_name="err.txt", job_report_name="report.json")
        self.assertEqual((result.n_events, result.exe_error_code), (3, 65))
        assert result.pilot_error is not None
        self.assertEqual(result.pilot_error[0], ErrorCode.NOLOCALSPACE)


class ReadTailTests(SynchronousTestCase):
    def test_reads_only_the_tail_of_a_big_file(self) -> None:
        # A 4 GiB sparse file: reading it whole would take seconds and gigabytes.
        path = Path(self.mktemp())
        with path.open("wb") as handle:
            handle.truncate(4 * 1024**3)
            handle.seek(0, 2)
            handle.write(b"\nFATAL out of memory\n")
        tail = read_tail(path, limit=1024)
        self.assertEqual(len(tail), 1024)
        self.assertTrue(tail.endswith("\nFATAL out of memory\n"))
        self.assertEqual(tail.strip("\0\n"), "FATAL out of memory")
        self.assertEqual(len(read_tail(path)), 64 * 1024)

    def test_small_missing_and_odd_files(self) -> None:
        path = Path(self.mktemp())
        self.assertEqual(read_tail(path), "")
        path.write_bytes(b"caf\xc3\xa9 \xff end")
        self.assertEqual(read_tail(path), "café \ufffd end")
        self.assertEqual(read_tail(path, limit=3), "end")
        self.assertEqual(read_tail(path, limit=0), "")
        directory = Path(self.mktemp())
        directory.mkdir()
        self.assertEqual(read_tail(directory), "")

    def test_cut_character_is_replaced(self) -> None:
        path = Path(self.mktemp())
        path.write_bytes("é".encode() * 10)
        self.assertEqual(read_tail(path, limit=3), "\ufffdé")
