"""bench/eventservice: how fast the pilot feeds an event-service payload, and how long it waits.

The whole pilot (``twistd -n pilot`` in its own process) runs one event-service job
against ``twistd -n panda-dev`` whose event calls answer
``--delay`` (200 ms) late, with the reference payload (``tests/es_payload.py``) doing
no work on 4 workers; archives go to a POSIX object store with ``cp``
(``pilot.demo_es``).  From the job's summary:

* ``ranges_per_s``: ranges reported finished per second of the payload's run;
* ``payload_wait_pct``: the time the workers spent waiting for ranges (from each "Ready
  for events" to its answer), as a share of the workers' time.

Nearly all of that wait is the start: the first ranges are fetched before the payload
starts, and a request sized by the workers' measured pace can only go out once they
have shown it, so a payload that does no work waits about one server round trip per
worker at the beginning (0.2 s x 4 workers), and then hardly at all.  The run is long
enough that this one-time cost is a fraction of a per cent, as it is for a real job of
hours: the job has as many ranges as the baseline payload gets through in ``--seconds``
(30) (at most the dev server's 100,000), so the pilot's run lasts longer than that; a fetch big enough to cover
that round trip from the first request would hold hundreds of ranges for a slow
payload, lost work if the pilot is killed.

Baseline, in this process: the same payload fed by a channel whose feeder hands out
ranges from memory at once (no server, no archives, no reports): ``raw_ranges_per_s``
is what the payload and the channel can do at all; ``ratio_vs_raw`` is the pilot's
share of it.  Targets (issue 12): ``ranges_per_s >= 500`` and ``payload_wait_pct < 1``.
Results go to stdout (last line ``eventservice key=value ...``) and
``bench-run/eventservice.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import react
from twisted.internet.utils import getProcessValue

from bench.common import add_targets_flag, headline, report_values
from pilot.demo_es import default_payload, prepare_site, run_es_job
from pilot.eventservice.channel import RangeChannel, Ranges
from pilot.eventservice.messages import ChannelMessageError, RangeDone, RangeFailed

WORKERS = 4
#: Ranges of the baseline run.
BASELINE_RANGES = 5000
#: The dev server's limit of ranges per job.
MAX_RANGES = 100_000
AT_LEAST = {"ranges_per_s": 500.0}
AT_MOST = {"payload_wait_pct": 1.0}


class MemoryFeeder:
    """Ranges from memory, at once: the baseline's feeder."""

    def __init__(self, count: int) -> None:
        self._next = 0
        self.count = count
        self.done = 0

    def next_ranges(self, worker: str) -> Deferred[Ranges | None]:
        if self._next >= self.count:
            return succeed(None)
        self._next += 1
        n = self._next
        item: Mapping[str, Any] = {
            "eventRangeID": f"1-1-1-{n}-1",
            "startEvent": n,
            "lastEvent": n,
            "LFN": "EVNT.bench.pool.root",
            "GUID": "00000000-0000-0000-0000-000000000000",
            "scope": "bench",
        }
        return succeed([item])

    def range_done(self, worker: str, message: RangeDone) -> None:
        self.done += 1

    def range_failed(self, worker: str, message: RangeFailed) -> None:
        self.done += 1

    def bad_message(self, worker: str, error: ChannelMessageError) -> None:
        raise AssertionError(str(error))

    def worker_gone(self, worker: str) -> None:
        pass


async def raw_rate(reactor: Any, payload: Path, run_dir: Path, count: int) -> float:
    """Ranges per second of the payload on a channel that answers from memory."""
    out = run_dir / "raw"
    out.mkdir(parents=True)
    feeder = MemoryFeeder(count)
    channel = RangeChannel(reactor, Path(f"/tmp/txpilot-bench-{id(feeder)}.sock"), feeder)
    await channel.listen()
    try:
        started = time.monotonic()
        code = await getProcessValue(
            sys.executable,
            [
                str(payload),
                "--workers",
                str(WORKERS),
                "--channel",
                str(channel.path),
                "--output-dir",
                str(out),
            ],
            reactor=reactor,
        )
        elapsed = time.monotonic() - started
    finally:
        await channel.close()
    if code != 0 or feeder.done != count:
        raise SystemExit(f"bench/eventservice: the baseline payload failed (exit {code}, {feeder.done} done)")
    return count / elapsed


async def main_async(reactor: Any, args: argparse.Namespace) -> None:
    run_dir = Path(args.dir).resolve()
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    payload = Path(args.payload).resolve() if args.payload else default_payload()
    if payload is None or not payload.is_file():
        raise SystemExit(
            "bench/eventservice: the reference payload tests/es_payload.py is needed (--payload)"
        )
    raw = await raw_rate(reactor, payload, run_dir, BASELINE_RANGES)
    ranges = args.ranges or min(MAX_RANGES, max(1000, round(raw * args.seconds)))
    site = prepare_site(run_dir / "pilot-run", payload, ranges=ranges, workers=WORKERS)
    status, job = await run_es_job(reactor, run_dir / "pilot-run", site, event_delay=args.delay)
    es = job.get("event_service") or {}
    payload_s = float(job.get("durations", {}).get("payload") or 0.0)
    if status != 0 or job.get("state") != "finished" or not payload_s:
        raise SystemExit(
            f"bench/eventservice: the ES job did not finish (pilot exit {status}, {job.get('state')})"
        )
    finished = int(es.get("ranges_finished", 0))
    rate = finished / payload_s
    wait_pct = 100.0 * float(es.get("payload_wait_seconds", 0.0)) / (WORKERS * payload_s)
    values: dict[str, Any] = {
        "ranges": ranges,
        "server_delay_s": args.delay,
        "workers": WORKERS,
        "ranges_finished": finished,
        "payload_s": round(payload_s, 3),
        "ranges_per_s": round(rate, 1),
        "payload_wait_pct": round(wait_pct, 3),
        "raw_ranges_per_s": round(raw, 1),
        "ratio_vs_raw": round(rate / raw, 3),
        "range_requests": es.get("range_requests"),
        "report_calls": es.get("report_calls"),
        "batches": es.get("batches"),
    }
    (run_dir.parent / "eventservice.json").write_text(json.dumps(values, indent=1) + "\n")
    sys.stdout.write("bench/eventservice:\n")
    ok = report_values({k: v for k, v in values.items() if k not in AT_MOST}, AT_LEAST, ">=", width=22)
    ok = report_values({k: values[k] for k in AT_MOST}, AT_MOST, "<=", width=22) and ok
    headline("eventservice", values, ["ranges_per_s", "payload_wait_pct", "ratio_vs_raw", "raw_ranges_per_s"])
    if not ok and args.check_targets:
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.eventservice", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--ranges", type=int, default=0, help="the job's ranges (0: see --seconds)")
    parser.add_argument(
        "--seconds",
        type=float,
        default=30.0,
        help="without --ranges: as many as the baseline does in this time",
    )
    parser.add_argument("--delay", type=float, default=0.2, help="seconds the server takes per event call")
    parser.add_argument("--payload", help="the reference ES payload (default: tests/es_payload.py)")
    parser.add_argument("--dir", default="bench-run/eventservice")
    add_targets_flag(parser)
    args = parser.parse_args(argv)
    react(lambda reactor: ensureDeferred(main_async(reactor, args)))


if __name__ == "__main__":
    main()
