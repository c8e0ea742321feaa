"""Tests for ``pilot.server.widths``: every string the pilot sends fits its server column.

Property tests (hypothesis) for the cutting functions and ``fit_update``; a check that
the pilot's widths are the dev server's (which follows the official schema); and the
proof against the strict dev server over real TLS, with the pilot's own client: an
update with oversized values is lost, the same update fitted is stored in full.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from treq.client import HTTPClient
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from pilot.devserver.columns import DISPATCH_COLUMNS, JOB_COLUMNS, STDOUT_WIDTH
from pilot.devserver.server import DevServer, start_dev_server
from pilot.model.credentials import Credentials
from pilot.server.api import ApiMode
from pilot.server.client import JobRequest, JobUpdate, PandaClient, RetryPolicy, StatusCode
from pilot.server.tls import PilotTLSPolicy
from pilot.server.widths import (
    REQUEST_FITS,
    UPDATE_FITS,
    cut_note,
    fit_request,
    fit_update,
    fitted_fields,
    head_chars,
    head_items,
    head_lines,
    items,
    storable,
    tail_lines,
    utf8_size,
)

reactor: Any = _reactor
QUEUE = "WIDTHS_QUEUE"

#: Characters that matter here: separators, newlines, 2-, 3- and 4-byte UTF-8, NUL, lone surrogates.
_SPECIAL = st.sampled_from(["a", "b", " ", "|", "\n", "é", "€", "😀", "\0", "\ud800", "\udc00"])
TEXT = st.text(alphabet=st.one_of(_SPECIAL, st.characters()), max_size=120)
#: Long text cheaply: a short text repeated.
LONG_TEXT = st.builds(lambda text, times: text * times, TEXT, st.integers(1, 60))
WIDTH = st.integers(0, 300)

#: JobUpdate string fields that go to no width-limited column (CLOB, file, parsed or not stored).
UNLIMITED_UPDATE_FIELDS = {
    "state",
    "timestamp",
    "site_name",
    "start_time",
    "end_time",
    "job_output_report",
    "meta_data",
}
#: The server's ``param`` key (dev server: the column) of each fitted JobUpdate field.
COLUMN_OF = {
    "pilot_error_diag": "pilotErrorDiag",
    "exe_error_diag": "exeErrorDiag",
    "job_metrics": "jobMetrics",
    "pilot_timing": "pilotTiming",
    "batch_id": "batchID",
    "job_sub_status": "jobSubStatus",
    "scheduler_id": "schedulerID",
    "cpu_consumption_unit": "cpuConsumptionUnit",
    "pilot_id": "pilotID",
    "cpu_architecture_level": "cpu_architecture_level",
    "node": "modificationHost",
}


def assert_storable(test: SynchronousTestCase, result: str, width: int) -> None:
    """Fits in ``width`` bytes, is valid UTF-8, holds no NUL."""
    test.assertLessEqual(len(result.encode("utf-8")), width)  # raises for a lone surrogate
    test.assertNotIn("\0", result)


def starts_at_line(text: str, suffix: str) -> bool:
    start = len(text) - len(suffix)
    return start == 0 or text[start - 1] == "\n"


class CutTests(SynchronousTestCase):
    """Each way of cutting: it fits, stays valid, is idempotent, and keeps the right part."""

    def cut(self, function: Callable[[str, int], str], text: str, width: int) -> tuple[str, str] | None:
        """The properties every cut has; (result, storable text) when something was cut, else None."""
        result = function(text, width)
        assert_storable(self, result, width)
        self.assertEqual(function(result, width), result)  # idempotent
        clean = storable(text)
        if utf8_size(clean) <= width:
            self.assertEqual(result, clean)  # what fits is left alone
            return None
        return result, clean

    @given(LONG_TEXT, WIDTH)
    def test_head_chars(self, text: str, width: int) -> None:
        if (cut := self.cut(head_chars, text, width)) is None:
            return
        result, clean = cut
        kept = result.removesuffix("...") if width > 3 else result
        self.assertTrue(clean.startswith(kept))
        self.assertGreater(utf8_size(kept), width - 3 - 4)  # at most one character short of the room

    @given(LONG_TEXT, WIDTH, st.sampled_from([" ", "|"]))
    def test_head_items(self, text: str, width: int, separator: str) -> None:
        if (cut := self.cut(items(separator), text, width)) is None:
            return
        result, clean = cut
        if result:  # whole items only: a prefix that ends right before a separator, none left dangling
            self.assertTrue(clean.startswith(result))
            self.assertEqual(clean[len(result)], separator)
            self.assertFalse(result.endswith(separator))

    @given(LONG_TEXT, WIDTH)
    def test_tail_lines(self, text: str, width: int) -> None:
        if (cut := self.cut(tail_lines, text, width)) is None:
            return
        result, clean = cut
        room = width - len(cut_note(utf8_size(clean))) - 1  # beside the longest note there could be
        if room <= 0:  # too narrow for any note: the end of the text alone
            self.assertTrue(clean.endswith(result))
            return
        note, _, body = result.partition("\n")
        self.assertTrue(clean.endswith(body))  # the newest part is kept
        self.assertEqual(note, cut_note(utf8_size(clean) - utf8_size(body)))  # says how much went
        # whole lines whenever the last line fits
        trailing = len(clean) - len(clean.rstrip("\n"))
        last_line = clean.rstrip("\n").rpartition("\n")[2] + "\n" * trailing
        if utf8_size(last_line) <= room and "\n" in clean[:-1]:
            self.assertTrue(starts_at_line(clean, body), (clean, body))

    @given(LONG_TEXT, WIDTH)
    def test_head_lines(self, text: str, width: int) -> None:
        if (cut := self.cut(head_lines, text, width)) is None:
            return
        result, clean = cut
        kept, newline, note = result.rpartition("\n")
        if newline and note == cut_note(utf8_size(clean) - utf8_size(kept + newline)):
            self.assertTrue(clean.startswith(kept + newline))  # whole first lines, then the note
        else:  # the first line alone does not fit: its start, like head_chars
            self.assertEqual(result, head_chars(clean, width))

    def test_examples(self) -> None:
        """What an operator reads: the newest lines under a note; whole metrics; the start of an id."""
        tail = "".join(f"event {i} done\n" for i in range(1000))
        fitted = tail_lines(tail, 2048)
        self.assertTrue(fitted.startswith("["))
        self.assertEqual(
            fitted.splitlines()[0], f"[{utf8_size(tail) - utf8_size(fitted.partition(chr(10))[2])} bytes cut]"
        )
        self.assertTrue(fitted.endswith("event 999 done\n"))
        self.assertEqual(head_items("coreCount=8 leak=12.5 chi2=0.3", 24, " "), "coreCount=8 leak=12.5")
        self.assertEqual(head_items("12|3|40|1|0|2", 7, "|"), "12|3|40")
        self.assertEqual(head_chars("é" * 10, 10), "ééé...")  # 6 bytes + 3, never half an é
        self.assertEqual(head_lines("first\nsecond\n" + "x" * 600, 40), "first\nsecond\n[600 bytes cut]")
        self.assertEqual(storable("a\0b\ud800"), "a\ufffdb\ufffd")


def long_update(panda_id: int = 1, state: str = "running") -> JobUpdate:
    """An update whose every fitted string is too long for its column, multi-byte included."""
    return JobUpdate(
        job_id=panda_id,
        state=state,
        stdout="".join(f"{i:05d} événement traité\n" for i in range(400)),
        pilot_log="pilot log line\n" * 400,
        pilot_error_diag="stage-out failed:\n" + "rucio said: accès refusé\n" * 40,
        exe_error_diag="é" * 600,
        job_metrics=" ".join(f"key{i}=value{i}" for i in range(100)),
        pilot_timing="|".join(str(n) for n in range(1000, 1060)),
        batch_id="b" * 100,
        job_sub_status="s" * 100,
        scheduler_id="harvester-" + "x" * 200,
        cpu_consumption_unit="s" * 200,
        pilot_id="p" * 300,
        cpu_architecture_level="x86_64-v3-" + "z" * 30,
        node="wn-" + "n" * 200,
    )


class FitUpdateTests(SynchronousTestCase):
    @given(st.lists(LONG_TEXT, min_size=len(UPDATE_FITS), max_size=len(UPDATE_FITS)))
    def test_every_field_fits(self, texts: list[str]) -> None:
        strings: dict[str, Any] = dict(zip(UPDATE_FITS, texts, strict=True))
        update = JobUpdate(job_id=7, state="running", **strings)
        fitted = fit_update(update)
        for name, fit in UPDATE_FITS.items():
            assert_storable(self, getattr(fitted, name), fit.width)
        self.assertEqual(fit_update(fitted), fitted)
        self.assertEqual(set(fitted_fields(update, fitted)) - set(UPDATE_FITS), set())
        self.assertEqual((fitted.job_id, fitted.state), (7, "running"))

    def test_fitting_values_are_left_alone(self) -> None:
        update = JobUpdate(job_id=1, state="finished", stdout="ok\n", job_metrics="coreCount=1", max_rss=5)
        self.assertIs(fit_update(update), update)
        request = JobRequest(site_name=QUEUE, computing_element="ce", prod_source_label="managed", node="wn")
        self.assertIs(fit_request(request), request)
        self.assertEqual(fitted_fields(update, update), ())

    def test_only_string_fields_are_touched(self) -> None:
        update = dataclasses.replace(long_update(), max_rss=123, job_output_report="{}" + " " * 5000)
        fitted = fit_update(update)
        self.assertEqual((fitted.max_rss, fitted.job_output_report), (123, update.job_output_report))
        self.assertEqual(set(fitted_fields(update, fitted)), set(UPDATE_FITS))

    def test_every_string_field_is_decided(self) -> None:
        """A new string field of JobUpdate must get a column width here, or be declared unlimited."""
        strings = {f.name for f in dataclasses.fields(JobUpdate) if "str" in str(f.type)}
        self.assertEqual(strings - set(UPDATE_FITS), UNLIMITED_UPDATE_FIELDS)
        self.assertEqual(set(UPDATE_FITS) - strings, set())

    def test_widths_are_the_dev_servers(self) -> None:
        """The pilot's widths and the strict dev server's (the official schema) are the same numbers."""
        self.assertEqual(UPDATE_FITS["stdout"].width, STDOUT_WIDTH)
        for name, column in COLUMN_OF.items():
            self.assertEqual((name, UPDATE_FITS[name].width), (name, JOB_COLUMNS[column]))
            self.assertEqual(UPDATE_FITS[name].column, f"jobsActive4.{column}")
        for name, fit in REQUEST_FITS.items():
            column, width = DISPATCH_COLUMNS[name]
            self.assertEqual((fit.column, fit.width), (f"jobsActive4.{column}", width))


class StrictServerTests(TestCase):
    """The pilot's own client against the strict dev server, over real TLS, both API generations."""

    async def start(self) -> DevServer:
        server = await start_dev_server(reactor, Path(self.mktemp()), queues={QUEUE: {}})
        self.addCleanup(lambda: Deferred.fromCoroutine(server.stop()))
        return server

    def client(self, server: DevServer, api: ApiMode) -> PandaClient:
        pool = HTTPConnectionPool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        credentials = Credentials(cacert=server.pki.ca_cert, proxy=server.pki.client_proxy)
        agent = Agent(reactor, contextFactory=PilotTLSPolicy(credentials), pool=pool)
        return PandaClient(HTTPClient(agent), server.url, reactor, api=api, retry=RetryPolicy(attempts=1))

    async def _check_update(self, api: ApiMode) -> None:
        server = await self.start()
        [panda_id] = await server.submit({"computingSite": QUEUE, "transformation": "/bin/true"})
        client = self.client(server, api)
        request = JobRequest(
            site_name=QUEUE, computing_element="ce-" + "c" * 200, prod_source_label="managed", node="wn"
        )
        self.assertEqual((await client.acquire_job(request)).status, StatusCode.NO_JOBS)
        self.assertEqual((await client.acquire_job(fit_request(request))).status, StatusCode.SUCCESS)

        update = long_update(panda_id)
        result = await client.update_job(update)
        self.assertEqual(result.status, StatusCode.FAILED)  # the whole update is lost
        self.assertEqual((await server.job(panda_id))["jobStatus"], "sent")

        fitted = fit_update(update)
        result = await client.update_job(fitted)
        self.assertEqual(result.status, StatusCode.SUCCESS)
        view = await server.job(panda_id)
        fields = view["pilotFields"]
        assert isinstance(fields, dict)
        self.assertEqual(view["jobStatus"], "running")
        self.assertEqual(fields["stdout"], fitted.stdout)
        self.assertTrue(str(fitted.stdout).endswith("00399 événement traité\n"))  # the newest line is there
        for name, column in COLUMN_OF.items():
            # the dev server keeps a few of them in their own columns (its schedulerID column is
            # the one set at dispatch), the others in pilotFields under the server's name
            stored = view[column] if column in view and column != "schedulerID" else fields[column]
            self.assertEqual((name, stored), (name, getattr(fitted, name)))  # stored in full, not cut

    async def test_v1(self) -> None:
        await self._check_update(ApiMode.V1)

    async def test_legacy(self) -> None:
        await self._check_update(ApiMode.LEGACY)
