"""PanDA error codes (generated from the TSV), diagnostics, and the exit-code table."""

from __future__ import annotations

import csv
import importlib.util
import signal
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from pilot.errorcodes import STANDARD_MESSAGES, ErrorCode
from pilot.errors import ExitCode, JobErrors, PilotError, error_for_signal, exit_code_for, format_diag

ROOT = Path(__file__).parent.parent


class GeneratedCodesTests(SynchronousTestCase):
    def test_generated_module_matches_the_tsv(self) -> None:
        spec = importlib.util.spec_from_file_location("gen_errorcodes", ROOT / "tools" / "gen_errorcodes.py")
        assert spec is not None and spec.loader is not None
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
        rows = tool.read_rows(ROOT / "pilot" / "data" / "error-codes.tsv")
        self.assertEqual(tool.render(rows), (ROOT / "pilot" / "errorcodes.py").read_text())
        with (ROOT / "pilot" / "data" / "error-codes.tsv").open() as handle:
            for row in csv.DictReader(handle, delimiter="\t"):
                code = ErrorCode[row["name"]]
                self.assertEqual(int(code), int(row["code"]))
                self.assertEqual(STANDARD_MESSAGES[code], row["description"])

    def test_well_known_numbers(self) -> None:
        self.assertEqual(
            (ErrorCode.PANDAKILL, ErrorCode.SIGTERM, ErrorCode.REACHEDMAXTIME, ErrorCode.PAYLOADEXCEEDMAXMEM),
            (1144, 1201, 1213, 1235),
        )


class DiagTests(SynchronousTestCase):
    def test_format_diag(self) -> None:
        self.assertEqual(
            format_diag(ErrorCode.NOLOCALSPACE), "Insufficient free disk space on the worker node"
        )
        self.assertEqual(
            format_diag(ErrorCode.NOLOCALSPACE, "1 GB\nleft"),
            "Insufficient free disk space on the worker node: 1 GB left",
        )
        long = format_diag(ErrorCode.GENERALERROR, "x" * 1000)
        self.assertEqual(len(long), 256)
        self.assertTrue(long.endswith("..."))
        self.assertEqual(PilotError(ErrorCode.MKDIR, "no").diag, "Directory creation failed: no")

    def test_first_error_wins_priority_in_front(self) -> None:
        errors = JobErrors()
        self.assertIsNone(errors.first)
        errors.record(ErrorCode.PAYLOADEXECUTIONFAILURE, "exit 1")
        errors.record(ErrorCode.MISSINGOUTPUTFILE, "a")
        errors.record(ErrorCode.PAYLOADEXECUTIONFAILURE, "again")
        first = errors.first
        assert first is not None
        self.assertEqual(first.code, ErrorCode.PAYLOADEXECUTIONFAILURE)
        self.assertIn("exit 1", first.diag)
        errors.record(ErrorCode.PANDAKILL, "server", priority=True)
        self.assertEqual(
            [e.code for e in errors],
            [ErrorCode.PANDAKILL, ErrorCode.PAYLOADEXECUTIONFAILURE, ErrorCode.MISSINGOUTPUTFILE],
        )

    def test_recoverable(self) -> None:
        errors = JobErrors()
        errors.record(ErrorCode.STAGEOUTFAILED)
        assert errors.first is not None
        self.assertTrue(errors.first.recoverable)


class ExitCodeTests(SynchronousTestCase):
    def test_pilot3_translation_table(self) -> None:
        table = {
            ErrorCode.CVMFSISNOTALIVE: 64,
            ErrorCode.GENERALERROR: 65,
            ErrorCode.MKDIR: 66,
            ErrorCode.NOSUCHFILE: 67,
            ErrorCode.NOVOMSPROXY: 68,
            ErrorCode.NOPROXY: 68,
            ErrorCode.CERTIFICATEHASEXPIRED: 68,
            ErrorCode.NOLOCALSPACE: 69,
            ErrorCode.UNKNOWNEXCEPTION: 70,
            ErrorCode.QUEUEDATA: 71,
            ErrorCode.QUEUEDATANOTOK: 72,
            ErrorCode.NOSOFTWAREDIR: 73,
            ErrorCode.JSONRETRIEVALTIMEOUT: 74,
            ErrorCode.BLACKHOLE: 75,
            ErrorCode.MIDDLEWAREIMPORTFAILURE: 76,
            ErrorCode.MISSINGINPUTFILE: 77,
            ErrorCode.PANDAQUEUENOTACTIVE: 78,
            ErrorCode.COMMUNICATIONFAILURE: 79,
            ErrorCode.PROXYTOOSHORT: 80,
            ErrorCode.REACHEDMAXTIME: 81,
            ErrorCode.NOJOBSINPANDA: 82,
            ErrorCode.PANDAQUEUENOTONLINE: 83,
            ErrorCode.KILLSIGNAL: 137,
            ErrorCode.SIGTERM: 143,
            ErrorCode.SIGQUIT: 131,
            ErrorCode.SIGSEGV: 139,
            ErrorCode.SIGXCPU: 152,
            ErrorCode.SIGUSR1: 138,
            ErrorCode.SIGINT: 130,
            ErrorCode.SIGBUS: 135,
        }
        for code, shell in table.items():
            self.assertEqual(int(exit_code_for(code)), shell, code.name)
        self.assertEqual(exit_code_for(None), ExitCode.OK)
        self.assertEqual(exit_code_for(ErrorCode.STAGEINFAILED), ExitCode.FAILURE)

    def test_signals(self) -> None:
        self.assertEqual(error_for_signal(signal.SIGTERM), ErrorCode.SIGTERM)
        self.assertEqual(error_for_signal(signal.SIGUSR1), ErrorCode.SIGUSR1)
        self.assertEqual(error_for_signal(signal.SIGHUP), ErrorCode.KILLSIGNAL)
