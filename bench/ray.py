"""bench/ray: how fast one pilot's channel feeds an event-service payload whose workers are Ray actors.

The pilot's own ``RangeChannel`` hands out ``--ranges`` (20,000) ranges from memory, at
once, ``--ranges-per-answer`` (2: the pilot's ``--es-ranges-per-request``) per ``Ready for
events``, to ``python -m pilot.hpc.raydriver --local 4 --workers 4`` with the built-in
processor doing no work: a local Ray of 4 CPUs, one actor each, every output shipped back
through Ray, written (fsync, rename) and reported on the actor's own connection.

* ``ranges_per_s``: ranges reported per second from the first range handed out to the
  last report (Ray's start, ``startup_s``, is a one-off per allocation, left out);
* the baseline, in the same process: the same channel and feeder feeding the reference
  payload (``tests/es_payload.py --workers 4``: local processes, no Ray), measured the
  same way; ``ratio_vs_local`` is the Ray driver's share of it.

Where the time goes: Ray costs about a millisecond of CPU per actor call (driver and
actor together), the same for one range as for many, so on this 2-core machine one range
per answer (the pilot's default) tops out below a thousand a second, and two per answer
(what a site running short ranges on Ray sets) double it.
Target: ``ranges_per_s >= 1000``.  Results go to stdout (last line
``ray ranges_per_s=<N> workers=<W> ratio_vs_local=<r> ...``) and ``bench-run/ray.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import react
from twisted.internet.utils import getProcessOutputAndValue

from bench.common import add_targets_flag, headline, report_values
from pilot.eventservice.channel import RangeChannel, Ranges
from pilot.eventservice.messages import ChannelMessageError, RangeDone, RangeFailed

WORKERS = 4
AT_LEAST = {"ranges_per_s": 1000.0}
ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = ROOT / "tests" / "es_payload.py"
#: The loopback address Ray's nodes use here (Ray maps 127.0.0.1 to the outward address).
NODE_IP = "127.0.0.2"


class TimedFeeder:
    """Ranges from memory, at once, ``per_answer`` at a time; when the first went and the last came back."""

    def __init__(self, count: int, per_answer: int) -> None:
        self.count = count
        self.per_answer = per_answer
        self.handed = 0
        self.done = 0
        self.failed = 0
        self.first_handed: float | None = None
        self.last_reported = 0.0

    def next_ranges(self, worker: str) -> Deferred[Ranges | None]:
        if self.handed >= self.count:
            return succeed(None)
        if self.first_handed is None:
            self.first_handed = time.monotonic()
        batch = []
        for n in range(self.handed + 1, min(self.count, self.handed + self.per_answer) + 1):
            batch.append(
                {
                    "eventRangeID": f"1-1-1-{n}-1",
                    "startEvent": n,
                    "lastEvent": n,
                    "LFN": "EVNT.bench.pool.root",
                    "GUID": "00000000-0000-0000-0000-000000000000",
                    "scope": "bench",
                }
            )
        self.handed += len(batch)
        return succeed(batch)

    def range_done(self, worker: str, message: RangeDone) -> None:
        self.done += 1
        self.last_reported = time.monotonic()

    def range_failed(self, worker: str, message: RangeFailed) -> None:
        self.failed += 1
        self.last_reported = time.monotonic()

    def bad_message(self, worker: str, error: ChannelMessageError) -> None:
        raise AssertionError(str(error))

    def worker_gone(self, worker: str) -> None:
        pass

    def rate(self) -> float:
        assert self.first_handed is not None
        return self.done / max(self.last_reported - self.first_handed, 1e-9)


async def feed(reactor: Any, argv: list[str], count: int, per_answer: int) -> tuple[TimedFeeder, float]:
    """Run ``argv`` (``{channel}`` replaced) against a fresh channel: the feeder, and the total seconds."""
    feeder = TimedFeeder(count, per_answer)
    sockets = Path(tempfile.mkdtemp(prefix="txr-bench-"))  # a short path: a socket's limit
    channel = RangeChannel(reactor, sockets / "es.sock", feeder)
    await channel.listen()
    try:
        started = time.monotonic()
        argv = [str(channel.path) if word == "{channel}" else word for word in argv]
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        out, err, code = await getProcessOutputAndValue(sys.executable, argv, env=env, reactor=reactor)
        elapsed = time.monotonic() - started
    finally:
        await channel.close()
        shutil.rmtree(sockets, ignore_errors=True)
    if code != 0 or feeder.done != count:
        sys.stderr.write(err.decode(errors="replace")[-3000:])
        raise SystemExit(f"bench/ray: {argv[:3]} failed (exit {code}, {feeder.done} of {count} done)")
    return feeder, elapsed


async def main_async(reactor: Any, args: argparse.Namespace) -> None:
    run_dir = Path(args.dir).resolve()
    shutil.rmtree(run_dir, ignore_errors=True)
    (run_dir / "local").mkdir(parents=True)
    (run_dir / "ray").mkdir()
    ray_temp = Path(tempfile.mkdtemp(prefix="txr-ray-"))  # Ray's sockets live under it: short
    try:
        baseline, _ = await feed(
            reactor,
            [
                str(PAYLOAD),
                "--workers",
                str(WORKERS),
                "--channel",
                "{channel}",
                "--output-dir",
                str(run_dir / "local"),
            ],
            args.ranges,
            args.ranges_per_answer,
        )
        driver = [
            *("-m", "pilot.hpc.raydriver", "--local", str(WORKERS), "--workers", str(WORKERS)),
            *("--channel", "{channel}", "--output-dir", str(run_dir / "ray")),
            *("--temp-dir", str(ray_temp), "--node-ip-address", NODE_IP),
        ]
        ray, total = await feed(reactor, driver, args.ranges, args.ranges_per_answer)
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)
    for payload in ("local", "ray"):  # every output there, then gone: 2 x 20,000 small files
        outputs = sum(1 for _ in (run_dir / payload).iterdir())
        if outputs != args.ranges:
            raise SystemExit(f"bench/ray: {outputs} outputs of {payload} for {args.ranges} ranges")
        shutil.rmtree(run_dir / payload)
    assert ray.first_handed is not None
    rate, local = ray.rate(), baseline.rate()
    values: dict[str, Any] = {
        "ranges": args.ranges,
        "ranges_per_answer": args.ranges_per_answer,
        "workers": WORKERS,
        "ranges_per_s": round(rate, 1),
        "local_ranges_per_s": round(local, 1),
        "ratio_vs_local": round(rate / local, 3),
        "ray_run_s": round(ray.last_reported - ray.first_handed, 3),
        "startup_s": round(total - (ray.last_reported - ray.first_handed), 3),
    }
    (run_dir.parent / "ray.json").write_text(json.dumps(values, indent=1) + "\n")
    sys.stdout.write("bench/ray:\n")
    ok = report_values(values, AT_LEAST, ">=", width=22)
    headline(
        "ray",
        values,
        ["ranges_per_s", "workers", "ratio_vs_local", "local_ranges_per_s", "ranges_per_answer"],
    )
    if not ok and args.check_targets:
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ray", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranges", type=int, default=20_000, help="ranges fed to each payload")
    parser.add_argument(
        "--ranges-per-answer",
        type=int,
        default=2,
        help="ranges per answer (the pilot's --es-ranges-per-request)",
    )
    parser.add_argument("--dir", default="bench-run/ray")
    add_targets_flag(parser)
    args = parser.parse_args(argv)
    react(lambda reactor: ensureDeferred(main_async(reactor, args)))


if __name__ == "__main__":
    main()
