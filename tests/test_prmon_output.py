"""The monitor's files in prmon's formats (``pilot.monitor.prmon_output``) and its SVG plot.

The expectations are prmon's, read from its source (https://github.com/HSF/prmon,
``package/src``): column order, integer columns, monotonic counters, the summary's
sections and keys, which values are averaged over samples and which are rates over
the wall time, and how averages are truncated.  The one known difference (rates are
true per-second rates, not multiplied by ``_SC_CLK_TCK``) is asserted as such.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from pilot.monitor import plot, prmon_output
from pilot.monitor.prmon_output import (
    SUMMARY_NAME,
    TIME_SERIES_NAME,
    TimeSeriesWriter,
    pilot_fields,
    prmon_average,
    summarise,
    write_summary,
)
from pilot.monitor.sample import Sample

SVG = "{http://www.w3.org/2000/svg}"

#: prmon's text header on Linux (libstdc++) without GPUs: wallmon, memmon, iomon, netmon, cpumon, countmon.
PRMON_HEADER = (
    "Time wtime pss rss swap vmem rchar read_bytes wchar write_bytes "
    "rx_bytes rx_packets tx_bytes tx_packets stime utime nprocs nthreads"
).split()
#: ``Max``: every text column but Time, as integers.
PRMON_MAX_KEYS = set(PRMON_HEADER) - {"Time"}
#: ``Avg``: levels (mean over samples) and iomon/netmon counters (rates); no wtime/utime/stime.
PRMON_LEVELS = {"nprocs", "nthreads", "pss", "rss", "swap", "vmem"}
PRMON_RATES = {
    "rchar",
    "read_bytes",
    "wchar",
    "write_bytes",
    "rx_bytes",
    "rx_packets",
    "tx_bytes",
    "tx_packets",
}
PRMON_AVG_KEYS = PRMON_LEVELS | PRMON_RATES

HARDWARE = {
    "cpu": {
        "CPUs": 8,
        "CoresPerSocket": 4,
        "ModelName": "Test CPU @ 2.0GHz",
        "Sockets": 1,
        "ThreadsPerCore": 2,
    },
    "mem": {"MemTotal": 16303404},
}


def make_sample(**values: Any) -> Sample:
    """A sample with zeros except ``values``."""
    fields: dict[str, Any] = dict.fromkeys(Sample.field_names(), 0)
    fields.update(stime=0.0, utime=0.0, time=1_700_000_000)
    fields.update(values)
    return Sample(**fields)


def example() -> list[Sample]:
    """Three samples, one minute apart, with every value worked out by hand in the tests."""
    return [
        make_sample(time=1_700_000_000, wtime=0, nprocs=1, nthreads=2, pss=1000, rss=1200, swap=0, vmem=5000),
        make_sample(
            time=1_700_000_060, wtime=60, nprocs=3, nthreads=7, pss=3000, rss=3300, swap=10, vmem=9000,
            rchar=6000, read_bytes=1200, wchar=3000, write_bytes=600,
            rx_bytes=600, rx_packets=6, tx_bytes=300, tx_packets=3, stime=3.5, utime=50.25,
        ),
        make_sample(
            time=1_700_000_120, wtime=120, nprocs=2, nthreads=4, pss=2000, rss=2400, swap=5, vmem=8000,
            rchar=12000, read_bytes=2400, wchar=6000, write_bytes=1200,
            rx_bytes=1200, rx_packets=12, tx_bytes=600, tx_packets=7, stime=7.9, utime=110.6,
        ),
    ]  # fmt: skip


class TimeSeriesTests(TestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir(parents=True)
        self.path = self.dir / TIME_SERIES_NAME

    def rows(self) -> tuple[list[str], list[dict[str, int]]]:
        """The header and the rows (as column -> int) of the file, parsed by its header."""
        lines = self.path.read_text(encoding="ascii").splitlines()
        header = lines[0].split("\t")
        return header, [dict(zip(header, map(int, line.split("\t")), strict=True)) for line in lines[1:]]

    def test_names(self) -> None:
        self.assertEqual(TIME_SERIES_NAME, "memory_monitor_output.txt")
        self.assertEqual(SUMMARY_NAME, "memory_monitor_summary.json")
        self.assertEqual(plot.PLOT_NAME, "memory_monitor_plot.svg")

    def test_header_and_lines_in_prmon_order(self) -> None:
        writer = TimeSeriesWriter(self.path)
        for sample in example():
            writer.append(sample)
        writer.close()
        text = self.path.read_text(encoding="ascii")
        self.assertEqual(text.splitlines()[0], "\t".join(PRMON_HEADER))
        self.assertTrue(text.endswith("\n"))
        header, rows = self.rows()
        self.assertEqual(header, PRMON_HEADER)
        # Every sample field is a column (``time`` is prmon's ``Time``).
        self.assertEqual(set(header), {"Time", *Sample.field_names()} - {"time"})
        self.assertEqual(len(rows), 3)
        self.assertEqual(
            rows[1],
            {
                "Time": 1_700_000_060, "wtime": 60, "pss": 3000, "rss": 3300, "swap": 10, "vmem": 9000,
                "rchar": 6000, "read_bytes": 1200, "wchar": 3000, "write_bytes": 600,
                "rx_bytes": 600, "rx_packets": 6, "tx_bytes": 300, "tx_packets": 3,
                "stime": 3, "utime": 50,  # whole seconds, truncated as prmon's tick division does
                "nprocs": 3, "nthreads": 7,
            },
        )  # fmt: skip
        self.assertEqual((rows[2]["stime"], rows[2]["utime"]), (7, 110))

    def test_lines_are_on_disk_before_close(self) -> None:
        """Each append is flushed: a pilot killed mid-job leaves every line written so far."""
        writer = TimeSeriesWriter(self.path)
        self.addCleanup(writer.close)
        samples = example()
        writer.append(samples[0])
        self.assertEqual(len(self.rows()[1]), 1)
        writer.append(samples[1])
        self.assertEqual([row["wtime"] for row in self.rows()[1]], [0, 60])

    def test_counters_never_go_down_levels_do(self) -> None:
        """prmon's monotonic values: a counter that drops (a child vanished) keeps its highest value."""
        first = make_sample(wtime=10, rchar=500, utime=9.0, rx_bytes=70, pss=900, nprocs=4)
        second = make_sample(wtime=20, rchar=100, utime=2.0, rx_bytes=10, pss=300, nprocs=1)
        with TimeSeriesWriter(self.path) as writer:
            writer.append(first)
            writer.append(second)
        rows = self.rows()[1]
        self.assertEqual((rows[1]["rchar"], rows[1]["utime"], rows[1]["rx_bytes"]), (500, 9, 70))
        self.assertEqual((rows[1]["pss"], rows[1]["nprocs"]), (300, 1))

    def test_unrepresentable_values_are_written_as_zero(self) -> None:
        with TimeSeriesWriter(self.path) as writer:
            writer.append(make_sample(wtime=5, utime=math.nan, stime=math.inf, pss=-3))
        row = self.rows()[1][0]
        self.assertEqual((row["utime"], row["stime"], row["pss"], row["wtime"]), (0, 0, 0, 5))
        self.assertEqual(summarise([make_sample(utime=math.inf)])["Max"]["utime"], 0)

    def test_restart_continues_our_file_replaces_others(self) -> None:
        samples = example()
        with TimeSeriesWriter(self.path) as writer:
            writer.append(samples[0])
        with TimeSeriesWriter(self.path) as writer:
            writer.append(samples[1])
        header, rows = self.rows()
        self.assertEqual(header, PRMON_HEADER)
        self.assertEqual([row["wtime"] for row in rows], [0, 60])

        self.path.write_text("something else\n1 2 3\n")
        with TimeSeriesWriter(self.path) as writer:
            writer.append(samples[2])
        header, rows = self.rows()
        self.assertEqual(header, PRMON_HEADER)
        self.assertEqual([row["wtime"] for row in rows], [120])

    def test_append_after_close_is_an_error(self) -> None:
        writer = TimeSeriesWriter(self.path)
        writer.close()
        writer.close()
        self.assertRaises(ValueError, writer.append, example()[0])
        self.assertFalse(self.path.exists())


class SummaryTests(TestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir(parents=True)
        self.path = self.dir / SUMMARY_NAME

    def written(self, summary: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        write_summary(self.path, summary)
        text = self.path.read_text(encoding="utf-8")
        parsed: dict[str, Any] = json.loads(text)
        return text, parsed

    def test_layout(self) -> None:
        text, summary = self.written(summarise(example(), HARDWARE))
        self.assertEqual(set(summary), {"Avg", "HW", "Max"})
        self.assertEqual(set(summary["Max"]), PRMON_MAX_KEYS)
        self.assertEqual(set(summary["Avg"]), PRMON_AVG_KEYS)
        self.assertNotIn("wtime", summary["Avg"])
        self.assertNotIn("utime", summary["Avg"])
        self.assertNotIn("stime", summary["Avg"])
        # prmon's maxima are integers, its averages doubles (even when whole: "2000.0").
        for name, value in summary["Max"].items():
            self.assertIs(type(value), int, name)
        for name, value in summary["Avg"].items():
            self.assertIs(type(value), float, name)
        self.assertIn('"pss": 2000.0', text)
        self.assertEqual(summary["HW"], HARDWARE)
        # nlohmann::json with setw(2): keys sorted, two-space indent, newline at the end.
        self.assertEqual(text, json.dumps(summary, indent=2, sort_keys=True) + "\n")
        self.assertTrue(text.startswith('{\n  "Avg": {\n    "nprocs": 2.0,\n'))

    def test_hand_computed_values(self) -> None:
        summary = summarise(example())
        self.assertNotIn("HW", summary)  # as prmon --suppress-hw-info
        self.assertEqual(
            summary["Max"],
            {
                "nprocs": 3, "nthreads": 7, "pss": 3000, "rss": 3300, "swap": 10, "vmem": 9000,
                "rchar": 12000, "read_bytes": 2400, "wchar": 6000, "write_bytes": 1200,
                "rx_bytes": 1200, "rx_packets": 12, "tx_bytes": 600, "tx_packets": 7,
                "stime": 7, "utime": 110, "wtime": 120,
            },
        )  # fmt: skip
        self.assertEqual(
            summary["Avg"],
            {
                # levels: mean over all three samples
                "nprocs": 2.0,  # (1 + 3 + 2) / 3
                "nthreads": 4.333,  # 13 / 3, truncated to 3 decimals
                "pss": 2000.0,  # 6000 / 3
                "rss": 2300.0,  # 6900 / 3
                "swap": 5.0,  # 15 / 3
                "vmem": 7333.0,  # 22000 / 3 = 7333.33.., above 1000: integer part
                # counters: final value / wall time (120 s)
                "rchar": 100.0, "read_bytes": 20.0, "wchar": 50.0, "write_bytes": 10.0,
                "rx_bytes": 10.0, "rx_packets": 0.1,
                "tx_bytes": 5.0, "tx_packets": 0.058,  # 7 / 120 = 0.05833.., truncated
            },
        )  # fmt: skip

    def test_rates_are_per_second_not_per_clock_tick(self) -> None:
        """prmon would write total * _SC_CLK_TCK / seconds (100x); we write bytes per second."""
        samples = [make_sample(wtime=0), make_sample(wtime=1000, rchar=2_000_000, write_bytes=500_000)]
        averages = summarise(samples)["Avg"]
        self.assertEqual(averages["rchar"], 2000.0)
        self.assertEqual(averages["write_bytes"], 500.0)

    def test_counter_maximum_and_rate_use_highest_value(self) -> None:
        samples = [make_sample(wtime=50, rchar=1000, utime=30.0), make_sample(wtime=100, rchar=10, utime=1.0)]
        summary = summarise(samples)
        self.assertEqual((summary["Max"]["rchar"], summary["Max"]["utime"]), (1000, 30))
        self.assertEqual(summary["Avg"]["rchar"], 10.0)  # 1000 / 100 s

    def test_zero_wall_time_divides_by_one_second(self) -> None:
        summary = summarise([make_sample(wtime=0, rchar=4096, pss=512)])
        self.assertEqual(summary["Avg"]["rchar"], 4096.0)
        self.assertEqual(summary["Avg"]["pss"], 512.0)
        self.assertEqual(summary["Max"]["wtime"], 0)

    def test_average_truncation(self) -> None:
        """prmon: integer part above 1000 (or when whole), else the fraction truncated to 1/1000."""
        self.assertEqual(prmon_average(1001.9), 1001.0)
        self.assertEqual(prmon_average(1000.5678), 1000.567)  # 1000 is not above 1000
        self.assertEqual(prmon_average(2.0), 2.0)
        self.assertEqual(prmon_average(0.0009), 0.0)
        self.assertEqual(prmon_average(12.3456), 12.345)
        self.assertIsInstance(prmon_average(5000.0), float)

    def test_no_samples(self) -> None:
        """Like prmon before its first sample: no Max/Avg rather than zeros posing as data."""
        self.assertEqual(summarise([]), {})
        self.assertEqual(summarise([], HARDWARE), {"HW": HARDWARE})
        self.assertEqual(pilot_fields(summarise([])), {})

    def test_write_is_atomic_and_leaves_no_temporary(self) -> None:
        self.path.write_text("old")
        write_summary(self.path, summarise(example()))
        self.assertEqual([entry.name for entry in self.dir.iterdir()], [SUMMARY_NAME])
        self.assertEqual(self.path.stat().st_mode & 0o777, 0o600)  # owner-only (issue 11, defect 12)

    def test_failed_write_keeps_old_file(self) -> None:
        self.path.write_text("old")
        self.assertRaises(ValueError, write_summary, self.path, {"Avg": {"pss": math.nan}})
        self.assertEqual(self.path.read_text(), "old")
        self.assertEqual([entry.name for entry in self.dir.iterdir()], [SUMMARY_NAME])

    def test_pilot_fields(self) -> None:
        _text, summary = self.written(summarise(example(), HARDWARE))
        fields = pilot_fields(summary)
        self.assertEqual(
            fields,
            {
                "maxRSS": 3300, "maxVMEM": 9000, "maxSWAP": 10, "maxPSS": 3000,
                "avgRSS": 2300, "avgVMEM": 7333, "avgSWAP": 5, "avgPSS": 2000,
                "totRCHAR": 12000, "totWCHAR": 6000, "totRBYTES": 2400, "totWBYTES": 1200,
                "rateRCHAR": 100, "rateWCHAR": 50, "rateRBYTES": 20, "rateWBYTES": 10,
            },
        )  # fmt: skip
        for value in fields.values():
            self.assertIs(type(value), int)

    def test_pilot_fields_skip_missing_and_bad_values(self) -> None:
        fields = pilot_fields(
            {"Max": {"rss": 10, "vmem": "x", "swap": True}, "Avg": {"pss": 1.9, "rss": math.inf}}
        )
        self.assertEqual(fields, {"maxRSS": 10, "avgPSS": 1})


def parse(document: str) -> ET.Element:
    return ET.fromstring(document)


def polylines(root: ET.Element) -> dict[str, list[tuple[float, float]]]:
    """Each series' points, by its ``data-series`` name."""
    found: dict[str, list[tuple[float, float]]] = {}
    for line in root.iter(f"{SVG}polyline"):
        points = [tuple(map(float, pair.split(","))) for pair in line.get("points", "").split()]
        found[line.get("data-series", "")] = [(x, y) for x, y in points]
    return found


def texts(root: ET.Element) -> list[str]:
    return ["".join(element.itertext()) for element in root.iter(f"{SVG}text")]


class PlotTests(TestCase):
    def check_document(self, root: ET.Element) -> tuple[float, float]:
        """A standalone SVG root with size and viewBox; returns the viewBox size."""
        self.assertEqual(root.tag, f"{SVG}svg")
        width, height = float(root.get("width", "0")), float(root.get("height", "0"))
        self.assertGreater(width, 0)
        self.assertGreater(height, 0)
        self.assertEqual(root.get("viewBox"), f"0 0 {width:g} {height:g}")
        return width, height

    def test_panels_series_axes_legend(self) -> None:
        samples = example()
        root = parse(plot.render_svg(samples, "job 4711"))
        width, height = self.check_document(root)
        series = polylines(root)
        self.assertEqual(set(series), {"rss", "pss", "vmem", "swap", "cpu"})
        for name in ("rss", "pss", "vmem", "swap"):
            self.assertEqual(len(series[name]), 3, name)
        self.assertEqual(len(series["cpu"]), 2)  # one rate per interval
        for points in series.values():
            for x, y in points:
                self.assertTrue(0 <= x <= width and 0 <= y <= height)
        # x increases with wall time; the RSS peak (second sample) is the highest point (lowest y).
        rss = series["rss"]
        self.assertLess(rss[0][0], rss[1][0])
        self.assertLess(rss[1][0], rss[2][0])
        self.assertEqual(min(rss, key=lambda point: point[1]), rss[1])
        labels = texts(root)
        for expected in (
            "RSS",
            "PSS",
            "VMEM",
            "swap",
            "cores used",
            "memory [MB]",
            "CPU [cores]",
            "Memory",
            "CPU",
        ):
            self.assertIn(expected, labels)
        self.assertIn("wall time [s]", labels)
        self.assertIn("job 4711", labels)
        ticks = [label for label in labels if label and label[0].isdigit()]
        self.assertIn("0", ticks)
        self.assertNotIn("no data", labels)

    def test_cores_used(self) -> None:
        cores = plot.cores_used(example())
        self.assertEqual([wtime for wtime, _ in cores], [60.0, 120.0])
        self.assertAlmostEqual(cores[0][1], (3.5 + 50.25) / 60)
        self.assertAlmostEqual(cores[1][1], (7.9 + 110.6 - 3.5 - 50.25) / 60)
        # No wall time elapsed: no rate; CPU time going down: zero, not negative.
        self.assertEqual(plot.cores_used([make_sample(wtime=5), make_sample(wtime=5, utime=9.0)]), [])
        self.assertEqual(
            plot.cores_used([make_sample(wtime=0, utime=50.0), make_sample(wtime=10, utime=5.0)]),
            [(10.0, 0.0)],
        )

    def test_no_data(self) -> None:
        for samples in ([], example()[:1]):
            root = parse(plot.render_svg(samples, "empty"))
            self.check_document(root)
            self.assertEqual(polylines(root), {})
            self.assertEqual(texts(root).count("no data"), 2)
            self.assertIn("RSS", texts(root))  # the legend is still there
            # Both axes on a default 0..1 scale, not one made from a lone sample's values.
            ticks = {element.text for element in root.iter(f"{SVG}text") if element.get("class") == "tick"}
            self.assertEqual(ticks, {"0", "0.2", "0.4", "0.6", "0.8", "1"})

    def test_title_is_text_not_markup(self) -> None:
        title = '<script>alert("x")</script> & <b>bold</b>\x00\x1b'
        document = plot.render_svg(example(), title)
        root = parse(document)
        self.assertNotIn("<script>", document)
        self.assertEqual(list(root.iter(f"{SVG}script")), [])
        self.assertEqual(list(root.iter("script")), [])
        self.assertEqual(list(root.iter(f"{SVG}b")), [])
        self.assertIn('<script>alert("x")</script> & <b>bold</b>', texts(root))
        self.assertEqual(root.findtext(f"{SVG}title"), '<script>alert("x")</script> & <b>bold</b>')

    def test_huge_and_odd_values(self) -> None:
        samples = [
            make_sample(wtime=0, rss=10**400, vmem=2**70, pss=0, utime=0.0),
            make_sample(wtime=10**20, rss=10**400, vmem=2**71, swap=10**18, utime=1e300),
            make_sample(wtime=10**20 + 1, rss=5, vmem=1, utime=math.inf),
        ]
        root = parse(plot.render_svg(samples, "huge"))
        width, height = self.check_document(root)
        series = polylines(root)
        self.assertEqual(set(series), {"rss", "pss", "vmem", "swap", "cpu"})
        for points in series.values():
            for x, y in points:
                self.assertTrue(math.isfinite(x) and math.isfinite(y))
                self.assertTrue(-1 <= x <= width + 1 and -1 <= y <= height + 1)

    def test_many_samples_are_thinned_but_keep_the_peak(self) -> None:
        samples = [make_sample(wtime=second, rss=1000) for second in range(20000)]
        samples[12345] = replace(samples[12345], rss=10**6)
        series = polylines(parse(plot.render_svg(samples, "long")))
        self.assertLess(len(series["rss"]), 5000)
        top = min(y for _x, y in series["rss"])
        self.assertEqual(sum(1 for _x, y in series["rss"] if y == top), 1)
        self.assertIn("wall time [h]", texts(parse(plot.render_svg(samples, "long"))))

    def test_write_plot(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        path = directory / plot.PLOT_NAME
        plot.write_plot(path, example(), "job")
        self.check_document(ET.parse(path).getroot())
        self.assertEqual([entry.name for entry in directory.iterdir()], [plot.PLOT_NAME])


class ModuleTests(TestCase):
    def test_columns_cover_sample(self) -> None:
        self.assertEqual(list(prmon_output.COLUMNS), PRMON_HEADER)
