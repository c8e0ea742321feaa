"""``pilot.eventservice.ranges``: the server's event ranges, and hostile ones."""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from pilot.errorcodes import ErrorCode
from pilot.eventservice.ranges import EventRangeError, parse_event_range, parse_event_ranges

GOOD: dict[str, Any] = {
    "eventRangeID": "12164365-3616045203-10980024041-4138-8",
    "startEvent": 4138,
    "lastEvent": 4140,
    "LFN": "EVNT.01234._000001.pool.root.1",
    "GUID": "9C81A8A2-7C4B-E311-9F4A-02163E00F7E4",
    "scope": "mc15_13TeV",
}


class ParseTests(SynchronousTestCase):
    def test_a_server_range(self) -> None:
        (r,) = parse_event_ranges([GOOD])
        self.assertEqual(r.range_id, GOOD["eventRangeID"])
        self.assertEqual((r.start_event, r.last_event, r.events), (4138, 4140, 3))
        self.assertEqual((r.lfn, r.scope), (GOOD["LFN"], "mc15_13TeV"))
        self.assertEqual(r.raw, GOOD)

    def test_legacy_json_string_and_unknown_fields_kept(self) -> None:
        extra = dict(GOOD, newField=[1, 2])
        (r,) = parse_event_ranges(json.dumps([extra]))
        self.assertEqual(r.raw["newField"], [1, 2])

    def test_no_ranges(self) -> None:
        self.assertEqual(parse_event_ranges([]), ())
        self.assertEqual(parse_event_ranges("[]"), ())

    def test_hostile_and_malformed_ranges(self) -> None:
        cases: dict[str, tuple[Any, str]] = {
            "traversal LFN": ([dict(GOOD, LFN="../../etc/passwd")], "unsafe file name"),
            "LFN with a query": ([dict(GOOD, LFN="EVNT?x=1")], "storage URL"),
            "id with a comma": ([dict(GOOD, eventRangeID="1,2")], "spaces or commas"),
            "id with a space": ([dict(GOOD, eventRangeID="1 2")], "spaces or commas"),
            "empty id": ([dict(GOOD, eventRangeID="")], "empty"),
            "long id": ([dict(GOOD, eventRangeID="x" * 300)], "too long"),
            "id not text": ([dict(GOOD, eventRangeID=5)], "must be text"),
            "bool event": ([dict(GOOD, startEvent=True)], "integer"),
            "negative event": ([dict(GOOD, startEvent=-1)], "integer"),
            "reversed": ([dict(GOOD, startEvent=9, lastEvent=1)], "after lastEvent"),
            "bad scope": ([dict(GOOD, scope="../x")], "Rucio scope"),
            "no GUID": ([{k: v for k, v in GOOD.items() if k != "GUID"}], "GUID must be text"),
            "not an object": (["range"], "not an object"),
            "not a list": ({"eventRangeID": "x"}, "must be a list"),
            "truncated JSON": ('[{"eventRangeID": "1-2', "not JSON"),
            "duplicate": ([GOOD, GOOD], "twice"),
        }
        for name, (value, why) in cases.items():
            with self.subTest(name):
                with self.assertRaises(EventRangeError) as caught:
                    parse_event_ranges(value)
                self.assertIn(why, str(caught.exception))
                self.assertEqual(caught.exception.code, ErrorCode.ESFATAL)

    def test_error_names_the_range(self) -> None:
        with self.assertRaises(EventRangeError) as caught:
            parse_event_range(dict(GOOD, LFN="/abs"))
        self.assertIn(GOOD["eventRangeID"], str(caught.exception))
