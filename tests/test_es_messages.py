"""``pilot.eventservice.messages``: the event-range channel grammar, and hostile payload lines."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from pilot.eventservice.messages import (
    NO_MORE_EVENTS,
    READY_FOR_EVENTS,
    ChannelMessageError,
    LineSplitter,
    RangeDone,
    RangeFailed,
    ReadyForEvents,
    parse_payload_message,
    ranges_message,
)

RANGE_ID = "12164365-3616045203-10980024041-4138-8"


class ParseTests(SynchronousTestCase):
    def test_ready(self) -> None:
        self.assertEqual(parse_payload_message("Ready for events"), ReadyForEvents())
        self.assertEqual(parse_payload_message("Ready for events\r"), ReadyForEvents())

    def test_done(self) -> None:
        message = parse_payload_message(f"/work/job/out/HITS.pool.root.1,ID:{RANGE_ID},CPU:12.5,WALL:13")
        self.assertEqual(
            message,
            RangeDone(range_id=RANGE_ID, output="/work/job/out/HITS.pool.root.1", cpu_s=12.5, wall_s=13.0),
        )

    def test_output_path_with_commas(self) -> None:
        message = parse_payload_message(f"/w/a,b,c.root,ID:{RANGE_ID},CPU:1,WALL:2")
        assert isinstance(message, RangeDone)
        self.assertEqual(message.output, "/w/a,b,c.root")
        self.assertEqual(message.range_id, RANGE_ID)

    def test_failed(self) -> None:
        message = parse_payload_message(f"ERR_ATHENAMP_PROCESS {RANGE_ID}: Failed to process event range")
        self.assertEqual(
            message,
            RangeFailed(range_id=RANGE_ID, code="ERR_ATHENAMP_PROCESS", text="Failed to process event range"),
        )

    def test_failed_without_space_after_colon(self) -> None:
        message = parse_payload_message(f"ERR_TE_FATAL {RANGE_ID}:bad input")
        self.assertEqual(message, RangeFailed(range_id=RANGE_ID, code="ERR_TE_FATAL", text="bad input"))

    def test_parse_error_carries_the_range_text(self) -> None:
        text = "{'eventRangeID': '" + RANGE_ID + "', 'startEvent': 1, 'lastEvent': 1}: cannot parse"
        message = parse_payload_message("ERR_ATHENAMP_PARSE " + text)
        assert isinstance(message, RangeFailed)
        self.assertEqual(message.range_id, RANGE_ID)
        self.assertEqual(message.code, "ERR_ATHENAMP_PARSE")

    def test_bad_messages_are_named(self) -> None:
        cases = {
            "hello": "unknown message",
            f"/out,ID:{RANGE_ID},CPU:x,WALL:1": "CPU is not a number",
            f"/out,ID:{RANGE_ID},CPU:nan,WALL:1": "finite",
            f"/out,ID:{RANGE_ID},CPU:-1,WALL:1": "finite",
            f"/out,ID:{RANGE_ID},WALL:1,CPU:1": "expected CPU:",
            f",ID:{RANGE_ID},CPU:1,WALL:1": "empty output path",
            "/out,ID:,CPU:1,WALL:1": "empty output path or range id",
            "ERR_lower id: x": "not an ERR_<CODE>",
            "ERR_X : text": "no range id",
            "ERR_X": "no range id",
        }
        for line, why in cases.items():
            with self.subTest(line=line):
                with self.assertRaises(ChannelMessageError) as caught:
                    parse_payload_message(line)
                self.assertIn(why, str(caught.exception))

    def test_unknown_message_is_quoted_short(self) -> None:
        with self.assertRaises(ChannelMessageError) as caught:
            parse_payload_message("x" * 10_000)
        self.assertLess(len(str(caught.exception)), 300)

    @given(st.text(max_size=300))
    def test_any_text_parses_or_is_a_message_error(self, line: str) -> None:
        try:
            parse_payload_message(line)
        except ChannelMessageError:
            pass


class AnswerTests(SynchronousTestCase):
    def test_ranges_are_one_json_line(self) -> None:
        ranges = [
            {"eventRangeID": RANGE_ID, "startEvent": 4138, "lastEvent": 4138, "LFN": "EVNT.01", "GUID": "g"}
        ]
        line = ranges_message(ranges)
        self.assertNotIn("\n", line)
        self.assertEqual(json.loads(line), ranges)

    def test_no_ranges_is_no_more_events_not_an_empty_list(self) -> None:
        self.assertRaises(ValueError, ranges_message, [])
        self.assertEqual(NO_MORE_EVENTS, "No more events")
        self.assertEqual(READY_FOR_EVENTS, "Ready for events")


class LineSplitterTests(SynchronousTestCase):
    def test_lines_across_chunks(self) -> None:
        splitter = LineSplitter()
        self.assertEqual(list(splitter.feed(b"Ready for")), [])
        self.assertEqual(splitter.pending, 9)
        self.assertEqual(list(splitter.feed(b" events\nReady for events\nERR")), ["Ready for events"] * 2)
        self.assertEqual(splitter.pending, 3)

    def test_utf8_split_inside_a_character(self) -> None:
        splitter = LineSplitter()
        data = "/w/ü.root,ID:1,CPU:1,WALL:1\n".encode()
        cut = data.index("ü".encode()) + 1
        self.assertEqual(list(splitter.feed(data[:cut])), [])
        self.assertEqual(list(splitter.feed(data[cut:])), ["/w/ü.root,ID:1,CPU:1,WALL:1"])

    def test_a_line_without_end_is_bounded_and_dropped(self) -> None:
        splitter = LineSplitter(max_bytes=1024)
        self.assertEqual(list(splitter.feed(b"x" * 1000)), [])
        (error,) = splitter.feed(b"x" * 100)
        self.assertIsInstance(error, ChannelMessageError)
        self.assertEqual(splitter.pending, 0, "the overlong line is dropped, not kept")
        self.assertEqual(list(splitter.feed(b"x" * 5000)), [])
        self.assertEqual(splitter.pending, 0)
        self.assertEqual(list(splitter.feed(b"tail\nReady for events\n")), ["Ready for events"])

    def test_bad_lines_do_not_stall_the_ones_after(self) -> None:
        splitter = LineSplitter(max_bytes=10)
        items = list(splitter.feed(b"\xff\xfe\n" + b"x" * 11 + b"\nReady\n"))
        self.assertIsInstance(items[0], ChannelMessageError)
        self.assertIn("not UTF-8", str(items[0]))
        self.assertIsInstance(items[1], ChannelMessageError)
        self.assertIn("longer than 10", str(items[1]))
        self.assertEqual(items[2], "Ready")
