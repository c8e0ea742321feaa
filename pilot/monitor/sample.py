"""One resource sample of a payload's process tree, in prmon's field names and units.

prmon (https://github.com/HSF/prmon) is what experiments already parse; using its names
and units (memory in kB, I/O in bytes, CPU and wall time in seconds, network counters
in bytes/packets) lets the same tools read our files.
"""

from __future__ import annotations

from dataclasses import fields

from pilot.util.records import record


@record(frozen=True)
class Sample:
    """The payload tree at one moment; counters (I/O, CPU, network) are cumulative."""

    time: int  # Unix time of the sample (prmon's ``Time``)
    wtime: int  # seconds since the monitor started
    nprocs: int
    nthreads: int
    pss: int  # kB
    rss: int  # kB
    swap: int  # kB
    vmem: int  # kB
    rchar: int  # bytes
    read_bytes: int
    wchar: int
    write_bytes: int
    rx_bytes: int
    rx_packets: int
    tx_bytes: int
    tx_packets: int
    stime: float  # seconds
    utime: float

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


#: Fields that are levels (their maximum and average mean something); the rest are counters.
LEVELS = ("nprocs", "nthreads", "pss", "rss", "swap", "vmem")
#: Cumulative counters (their maximum is the total at the end).
COUNTERS = (
    "rchar", "read_bytes", "wchar", "write_bytes",
    "rx_bytes", "rx_packets", "tx_bytes", "tx_packets",
    "stime", "utime",
)  # fmt: skip
