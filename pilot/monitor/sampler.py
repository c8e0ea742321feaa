"""Sampling a payload's whole process tree with psutil (reads /proc; no child processes).

One pass visits the payload's process and every descendant: memory (RSS, PSS and swap
from ``smaps_rollup``, VMEM), threads, CPU and I/O.  CPU and I/O of processes that have
already exited are kept: counters only ever grow (a child that exits takes its counters
with it unless its parent reaps it, so the sampler remembers the last value it saw for
every pid).  Network counters are the node's (``/proc/net/dev``, as prmon reports them:
per network namespace, and a payload shares the pilot's).

Sampling is synchronous and cheap (tens of microseconds per process); the monitor runs it
in a worker thread anyway so that a tree of hundreds of processes cannot stall the reactor.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import psutil

from pilot.monitor.sample import Sample
from pilot.util.records import record


@record
class _Seen:
    """The last counters read from one process (kept after it exits)."""

    utime: float = 0.0
    stime: float = 0.0
    rchar: int = 0
    wchar: int = 0
    read_bytes: int = 0
    write_bytes: int = 0


class TreeSampler:
    """Samples the tree under ``pid``; ``started`` is the monitor's start (for ``wtime``)."""

    def __init__(self, pid: int, *, started: float, now: Callable[[], float] = time.time) -> None:
        self.pid = pid
        self.started = started
        self._now = now
        self._seen: dict[tuple[int, float], _Seen] = {}
        self._net_start = _net_counters()
        self._procs: dict[int, psutil.Process] = {}

    def _tree(self) -> list[psutil.Process]:
        """The live tree; Process objects are reused so psutil's pid-reuse check holds."""
        try:
            root = self._procs.get(self.pid) or psutil.Process(self.pid)
            found = [root, *root.children(recursive=True)]
        except psutil.Error:
            return []
        procs: list[psutil.Process] = []
        fresh: dict[int, psutil.Process] = {}
        for process in found:
            known = self._procs.get(process.pid)
            chosen = known if known is not None and known == process else process
            fresh[process.pid] = chosen
            procs.append(chosen)
        self._procs = fresh
        return procs

    def sample(self) -> Sample:
        """One sample now (zeros for levels when the tree is gone; counters are kept)."""
        now = self._now()
        levels = {"nprocs": 0, "nthreads": 0, "pss": 0, "rss": 0, "swap": 0, "vmem": 0}
        for process in self._tree():
            try:
                with process.oneshot():
                    key = (process.pid, process.create_time())
                    times = process.cpu_times()
                    memory = process.memory_info()
                    threads = process.num_threads()
                    try:
                        full = process.memory_full_info()
                        pss, swap = getattr(full, "pss", memory.rss), getattr(full, "swap", 0)
                    except psutil.AccessDenied:
                        pss, swap = memory.rss, 0
                    try:
                        io = process.io_counters()
                    except (psutil.AccessDenied, AttributeError):
                        io = None
            except psutil.Error:
                continue
            levels["nprocs"] += 1
            levels["nthreads"] += threads
            levels["rss"] += memory.rss
            levels["vmem"] += memory.vms
            levels["pss"] += pss
            levels["swap"] += swap
            seen = self._seen.setdefault(key, _Seen())
            # Own times only: a reaped child's time would otherwise count twice, in its
            # own entry and in its parent's children_* (exact totals come from the
            # pilot's RUSAGE_CHILDREN when the payload ends).
            seen.utime = max(seen.utime, times.user)
            seen.stime = max(seen.stime, times.system)
            if io is not None:
                seen.rchar = max(seen.rchar, getattr(io, "read_chars", 0))
                seen.wchar = max(seen.wchar, getattr(io, "write_chars", 0))
                seen.read_bytes = max(seen.read_bytes, io.read_bytes)
                seen.write_bytes = max(seen.write_bytes, io.write_bytes)
        net = _net_counters()
        return Sample(
            time=int(now),
            wtime=max(0, int(round(now - self.started))),
            nprocs=levels["nprocs"],
            nthreads=levels["nthreads"],
            pss=levels["pss"] // 1024,
            rss=levels["rss"] // 1024,
            swap=levels["swap"] // 1024,
            vmem=levels["vmem"] // 1024,
            rchar=sum(s.rchar for s in self._seen.values()),
            read_bytes=sum(s.read_bytes for s in self._seen.values()),
            wchar=sum(s.wchar for s in self._seen.values()),
            write_bytes=sum(s.write_bytes for s in self._seen.values()),
            rx_bytes=max(0, net[0] - self._net_start[0]),
            rx_packets=max(0, net[1] - self._net_start[1]),
            tx_bytes=max(0, net[2] - self._net_start[2]),
            tx_packets=max(0, net[3] - self._net_start[3]),
            stime=round(sum(s.stime for s in self._seen.values()), 2),
            utime=round(sum(s.utime for s in self._seen.values()), 2),
        )


def _net_counters() -> tuple[int, int, int, int]:
    try:
        counters = psutil.net_io_counters()
    except (OSError, RuntimeError):
        return (0, 0, 0, 0)
    if counters is None:
        return (0, 0, 0, 0)
    return (counters.bytes_recv, counters.packets_recv, counters.bytes_sent, counters.packets_sent)
