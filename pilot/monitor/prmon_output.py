"""Our memory monitor's results in prmon's own file formats.

ATLAS and PanDA tooling already reads prmon's two files (https://github.com/HSF/prmon):
a tab-separated time series and a JSON summary.  Writing the same names, columns, units
and summary rules lets those tools, and people used to them, read ours unchanged.  What
follows was read from prmon's source (``package/src``), not guessed:

* Time series (``prmon.cpp``): a header line ``Time`` + the monitors' column names, then
  one line per sample, every value an integer.  Columns come monitor by monitor in the
  iteration order of prmon's ``std::unordered_map`` of monitors (libstdc++ on Linux,
  no GPU: wallmon, memmon, iomon, netmon, cpumon, countmon), and within a monitor in
  ``std::map`` (alphabetical) order.  CPU times are whole seconds (clock ticks divided
  by ``_SC_CLK_TCK`` in integer arithmetic).
* Counters (wall time, CPU times, I/O, network) are "monotonic" in prmon
  (``parameter.cpp``): a reading lower than the last one is refused, so the file and
  the summary show the highest value seen.  Levels (processes, threads, memory) are
  taken as read.
* Summary (``prmon.cpp``, nlohmann::json, so keys sorted, indented by 2): ``Max`` holds
  every column but ``Time`` as integers: the peak for levels, the final value for
  counters.  ``Avg`` holds, as floating point numbers, the mean over all samples of the
  levels (``nprocs``, ``nthreads``, ``pss``, ``rss``, ``swap``, ``vmem``) and the
  counters of ``iomon`` and ``netmon`` divided by the wall time (rates, unit "B/s" or
  "1/s" in prmon's ``--units``); there is no average for ``wtime``, ``utime``,
  ``stime``.  Averages are truncated: above 1000 to an integer, below to 3 decimals.
  ``HW`` holds ``cpu`` (from ``lscpu``) and ``mem`` (``MemTotal`` in kB) unless prmon
  runs with ``--suppress-hw-info``.

Two deliberate differences: the ``prmon`` section (``{"Version": ...}``) is left out, as
this is not prmon; and rates are true per-second rates.  prmon's ``iomon`` and ``netmon``
compute ``total * sysconf(_SC_CLK_TCK) / elapsed``, but since prmon 3.0 (the wall time
monitor keeps seconds, not clock ticks) ``elapsed`` is in seconds, which makes prmon's
rates ``_SC_CLK_TCK`` (usually 100) times the documented B/s.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from pilot.monitor.sample import LEVELS, Sample
from pilot.util.files import write_text_atomically

TIME_SERIES_NAME = "memory_monitor_output.txt"
SUMMARY_NAME = "memory_monitor_summary.json"

#: prmon's text columns, in the order prmon writes them (see the module docstring).
COLUMNS: tuple[str, ...] = (
    "Time",
    "wtime",
    "pss", "rss", "swap", "vmem",
    "rchar", "read_bytes", "wchar", "write_bytes",
    "rx_bytes", "rx_packets", "tx_bytes", "tx_packets",
    "stime", "utime",
    "nprocs", "nthreads",
)  # fmt: skip

#: Counters whose summary average is a rate (per second of wall time): iomon's and netmon's.
RATES: tuple[str, ...] = (
    "rchar", "read_bytes", "wchar", "write_bytes",
    "rx_bytes", "rx_packets", "tx_bytes", "tx_packets",
)  # fmt: skip

#: Columns prmon never lets decrease (its "monotonic" monitored values).
MONOTONIC: tuple[str, ...] = ("wtime", *RATES, "stime", "utime")

#: prmon's ``avg_precision``: averages above it are truncated to an integer, below it to 1/1000.
AVG_PRECISION = 1000

#: PanDA job update fields taken from the summary's ``Max`` section, and the prmon name behind each.
PILOT_MAX_FIELDS: tuple[tuple[str, str], ...] = (
    ("maxRSS", "rss"), ("maxVMEM", "vmem"), ("maxSWAP", "swap"), ("maxPSS", "pss"),
)  # fmt: skip
#: ... from ``Avg`` (memory levels, kB).
PILOT_AVG_FIELDS: tuple[tuple[str, str], ...] = (
    ("avgRSS", "rss"), ("avgVMEM", "vmem"), ("avgSWAP", "swap"), ("avgPSS", "pss"),
)  # fmt: skip
#: ... totals from ``Max`` (bytes).
PILOT_TOTAL_FIELDS: tuple[tuple[str, str], ...] = (
    ("totRCHAR", "rchar"), ("totWCHAR", "wchar"), ("totRBYTES", "read_bytes"), ("totWBYTES", "write_bytes"),
)  # fmt: skip
#: ... rates from ``Avg`` (bytes per second).
PILOT_RATE_FIELDS: tuple[tuple[str, str], ...] = (
    ("rateRCHAR", "rchar"), ("rateWCHAR", "wchar"), ("rateRBYTES", "read_bytes"), ("rateWBYTES", "write_bytes"),
)  # fmt: skip


def _column_value(sample: Sample, column: str) -> int:
    """One value as prmon writes it: a non-negative integer (prmon's values are unsigned).

    A value no integer can stand for (NaN, infinity: never from the sampler) is written
    as 0 rather than stopping the monitor.
    """
    raw = sample.time if column == "Time" else getattr(sample, column)
    if isinstance(raw, float) and not math.isfinite(raw):
        return 0
    return max(0, int(raw))  # int() truncates CPU seconds as prmon's integer division does


class TimeSeriesWriter:
    """Appends samples to a prmon-format time series, one flushed line per sample.

    The handle stays open and every line is flushed to the kernel at once, so a line
    written is a line kept even if the pilot is killed the next moment.  The header is
    written by the first ``append``; a file that already starts with our header (a
    monitor restarted for the same job) is continued rather than truncated, anything
    else at ``path`` is replaced, as prmon replaces its output file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: IO[str] | None = None
        self._closed = False
        #: Highest value seen per monotonic column: prmon never writes a counter going down.
        self._floor: dict[str, int] = {}

    def _open(self) -> IO[str]:
        header = "\t".join(COLUMNS) + "\n"
        try:
            with self.path.open(encoding="ascii", errors="replace", newline="") as existing:
                continuing = existing.readline() == header
        except FileNotFoundError:
            continuing = False
        handle = self.path.open("a" if continuing else "w", encoding="ascii", newline="")
        if not continuing:
            handle.write(header)
            handle.flush()
        return handle

    def append(self, sample: Sample) -> None:
        """Write ``sample`` as one line (the header first, on the first call)."""
        if self._closed:
            raise ValueError(f"{self.path}: time series writer is closed")
        if self._handle is None:
            self._handle = self._open()
        values: list[str] = []
        for column in COLUMNS:
            value = _column_value(sample, column)
            if column in MONOTONIC:
                value = max(value, self._floor.get(column, 0))
                self._floor[column] = value
            values.append(str(value))
        self._handle.write("\t".join(values) + "\n")
        self._handle.flush()

    def close(self) -> None:
        """Close the file; further appends are an error (closing twice is not)."""
        self._closed = True
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> TimeSeriesWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def prmon_average(value: float) -> float:
    """Truncate an average as prmon does before writing it (see ``AVG_PRECISION``).

    prmon splits the value with ``modf``: above ``AVG_PRECISION`` (or with no fraction)
    it keeps the integer part, otherwise the fraction truncated to thousandths.  The
    result stays a float, as prmon's averages are doubles (``2000.0`` in the JSON).
    """
    fraction, integer = math.modf(value)
    if integer > AVG_PRECISION or fraction == 0.0:
        return integer
    return integer + int(fraction * AVG_PRECISION) / AVG_PRECISION


def _plain(value: Any) -> Any:
    """A JSON-ready copy: nested mappings become dicts, sequences (not strings) lists."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


class RunningSummary:
    """prmon's summary kept up to date sample by sample (constant cost per sample).

    The monitor writes the summary after every sample and sends its fields with every
    heartbeat; recomputing it from all samples would cost O(n) each time, O(n²) over a
    job of days at the debug interval.
    """

    def __init__(self) -> None:
        self.count = 0
        self._maxima: dict[str, int] = {}
        self._sums: dict[str, float] = dict.fromkeys(LEVELS, 0.0)

    def add(self, sample: Sample) -> None:
        self.count += 1
        for column in COLUMNS[1:]:
            value = _column_value(sample, column)
            if value > self._maxima.get(column, -1):
                self._maxima[column] = value
        for level in LEVELS:
            self._sums[level] += _column_value(sample, level)

    def summary(self, hardware: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """prmon's JSON summary: ``Max``, ``Avg`` and (if given) ``HW``.

        ``hardware`` is prmon's ``HW`` section as is (``{"cpu": {"ModelName": ..., "CPUs": ...},
        "mem": {"MemTotal": kB}}``); without it the section is left out, as with prmon's
        ``--suppress-hw-info``.  With no samples there is no ``Max`` or ``Avg`` either: prmon
        writes them only once it has monitored, and zeros would be taken for measurements.
        """
        summary: dict[str, Any] = {}
        if self.count:
            maxima = dict(self._maxima)
            # prmon divides by the wall time so far, never by zero (wallmon's get_wallclock_t).
            elapsed = maxima["wtime"] or 1
            averages = {level: self._sums[level] / self.count for level in LEVELS}
            averages.update({counter: maxima[counter] / elapsed for counter in RATES})
            summary["Avg"] = {name: prmon_average(averages[name]) for name in sorted(averages)}
            summary["Max"] = {name: maxima[name] for name in sorted(maxima)}
        if hardware is not None:
            summary["HW"] = _plain(hardware)
        return dict(sorted(summary.items()))


def summarise(samples: Sequence[Sample], hardware: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """prmon's JSON summary for ``samples`` (see ``RunningSummary.summary``)."""
    running = RunningSummary()
    for sample in samples:
        running.add(sample)
    return running.summary(hardware)


def write_summary(path: Path, summary: Mapping[str, Any]) -> None:
    """Write ``summary`` as prmon does: keys sorted, 2-space indent, UTF-8, final newline.

    NaN and infinities are refused: they are not JSON, and prmon cannot produce them.
    """
    text = json.dumps(_plain(summary), indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)
    write_text_atomically(path, text + "\n")


def _as_int(section: Any, name: str) -> int | None:
    """``section[name]`` as an int, or None when it is missing or not a finite number."""
    if not isinstance(section, Mapping):
        return None
    value = section.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return int(value)


def pilot_fields(summary: Mapping[str, Any]) -> dict[str, int]:
    """The PanDA job update fields from a prmon-format summary (as the PanDA pilot maps them).

    Memory in kB, totals in bytes, rates in bytes per second, all integers (averages
    truncated).  A field whose value is missing from the summary is left out rather than
    sent as zero, which the server would store as a measurement.
    """
    maxima, averages = summary.get("Max"), summary.get("Avg")
    fields: dict[str, int] = {}
    for section, table in (
        (maxima, PILOT_MAX_FIELDS),
        (averages, PILOT_AVG_FIELDS),
        (maxima, PILOT_TOTAL_FIELDS),
        (averages, PILOT_RATE_FIELDS),
    ):
        for field, name in table:
            value = _as_int(section, name)
            if value is not None:
                fields[field] = value
    return fields
