"""bench/staging: the pilot's stage-in against plain xrdcp, and parallel against serial.

1. One 1 GiB file over XRootD (a real xrootd on loopback): the pilot's stage-in
   (staging engine + xrdcp copytool, adler32 verified against the catalogue value)
   against plain ``xrdcp`` of the same file in the same run, and against
   ``xrdcp --cksum adler32:<value>``.  Throughput ratio = plain time / pilot time.
2. 200 files of 1 MiB: the pilot's default staging (parallel transfers, bulk xrdcp)
   against one file at a time (one xrdcp per file, serially — what a pilot that
   loops over its inputs does), plus parallel without bulk for reference.

Each measurement is the median of ``--repeat`` rounds, rotating the contenders' order;
ratios are the median of per-round ratios.
Results go to stdout and ``bench-run/staging.json``.  Needs xrootd and xrdcp
(``.ci/install-services.sh``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import zlib
from pathlib import Path
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import react
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue

from bench.common import add_targets_flag, headline, report_values
from pilot.model.job import Checksum
from pilot.staging.engine import StagingEngine
from pilot.staging.plan import FileTransfer
from pilot.staging.registry import CopytoolRegistry
from pilot.staging.tools.base import ToolContext
from pilot.staging.transfer import Attempt, Direction
from tests.services import XRootDServer

TARGETS = {"single_file_ratio_vs_plain": 0.95, "parallel_speedup": 3.0}


def write_random(path: Path, size: int) -> str:
    """Write ``size`` random bytes (in 8 MiB blocks) and return their adler32."""
    adler = 1
    block = os.urandom(8 << 20)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        written = 0
        while written < size:
            chunk = block[: min(len(block), size - written)]
            handle.write(chunk)
            adler = zlib.adler32(chunk, adler)
            written += len(chunk)
    return f"{adler & 0xFFFFFFFF:08x}"


async def timed_command(reactor: Any, argv: list[str], env: dict[str, str]) -> float:
    started = time.monotonic()
    out, err, code = await getProcessOutputAndValue(argv[0], argv[1:], env=env, reactor=reactor)
    if code != 0:
        raise SystemExit(f"{argv[0]} failed: {(out + err).decode(errors='replace')[-500:]}")
    return time.monotonic() - started


def engine(reactor: Any, server: XRootDServer, workdir: Path, *, parallel: int, bulk: int) -> StagingEngine:
    context = ToolContext(
        spawner=reactor,
        clock=reactor,
        in_thread=deferToThread,
        env=server.client_env(),
        logdir=workdir / "logs",
    )
    return StagingEngine(
        CopytoolRegistry(), context, parallel=parallel, bulk_size=bulk, progress_interval=3600
    )


def transfer(
    server: XRootDServer, workdir: Path, lfn: str, size: int, adler32: str, where: str
) -> FileTransfer:
    return FileTransfer(
        Direction.IN, lfn, "bench", "", workdir / lfn, size, Checksum("adler32", adler32), "pr",
        [Attempt("xrdcp", f"{server.root_url}/{where}/{lfn}", "BENCH")],
    )  # fmt: skip


async def pilot_stage_in(
    reactor: Any, server: XRootDServer, transfers: list[FileTransfer], workdir: Path, **kw: int
) -> float:
    started = time.monotonic()
    await engine(reactor, server, workdir, **kw).run(transfers)
    elapsed = time.monotonic() - started
    failed = [t.error for t in transfers if not t.done]
    if failed:
        raise SystemExit(f"pilot stage-in failed: {failed[:3]}")
    return elapsed


def fresh(directory: Path) -> Path:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory


async def settle() -> None:
    """Flush dirty pages so that no run pays for the writeback of the one before."""
    await deferToThread(os.sync)


async def single_file(
    reactor: Any, server: XRootDServer, run_dir: Path, size: int, repeat: int
) -> dict[str, Any]:
    adler = await deferToThread(write_random, server.path_of("/bench/big.bin"), size)
    env = server.client_env()
    xrdcp = shutil.which("xrdcp") or "xrdcp"
    source = f"{server.root_url}//bench/big.bin"
    times: dict[str, list[float]] = {"plain": [], "checked": [], "pilot": []}

    async def plain(target: Path) -> float:
        return await timed_command(reactor, [xrdcp, "-f", "-N", source, str(target / "big.bin")], env)

    async def checked(target: Path) -> float:
        argv = [xrdcp, "-f", "-N", "--cksum", f"adler32:{adler}", source, str(target / "big.bin")]
        return await timed_command(reactor, argv, env)

    async def pilot(target: Path) -> float:
        transfers = [transfer(server, target, "big.bin", size, adler, "/bench")]
        return await pilot_stage_in(reactor, server, transfers, target, parallel=1, bulk=1)

    contenders = [("plain", plain), ("checked", checked), ("pilot", pilot)]
    for i in range(repeat):
        for name, run in contenders[i % 3 :] + contenders[: i % 3]:  # rotate the order
            target = fresh(run_dir / name)
            await settle()
            times[name].append(await run(target))
            shutil.rmtree(target)
    mib = size / (1 << 20)
    result: dict[str, Any] = {
        "size_mib": round(mib),
        "plain_xrdcp_s": round(statistics.median(times["plain"]), 3),
        "xrdcp_with_cksum_s": round(statistics.median(times["checked"]), 3),
        "pilot_stage_in_s": round(statistics.median(times["pilot"]), 3),
    }
    result["plain_mib_per_s"] = round(mib / result["plain_xrdcp_s"], 1)
    result["pilot_mib_per_s"] = round(mib / result["pilot_stage_in_s"], 1)
    # Ratios per round, then their median: a slow spell of the machine (shared VMs,
    # writeback) hits both contenders of a round and cancels out.
    pairs = zip(times["plain"], times["checked"], times["pilot"], strict=True)
    ratios = [(plain / pilot, checked / pilot) for plain, checked, pilot in pairs]
    result["single_file_ratio_vs_plain"] = round(statistics.median(r[0] for r in ratios), 3)
    result["ratio_vs_xrdcp_with_cksum"] = round(statistics.median(r[1] for r in ratios), 3)
    server.path_of("/bench/big.bin").unlink()
    return result


async def many_files(
    reactor: Any, server: XRootDServer, run_dir: Path, count: int, repeat: int
) -> dict[str, Any]:
    files = []
    for i in range(count):
        lfn = f"small{i:04d}.bin"
        files.append((lfn, await deferToThread(write_random, server.path_of(f"/bench/many/{lfn}"), 1 << 20)))
    modes = [
        ("one_at_a_time", {"parallel": 1, "bulk": 1}),
        ("parallel_no_bulk", {"parallel": 4, "bulk": 1}),
        ("default", {"parallel": 4, "bulk": 32}),
    ]
    times: dict[str, list[float]] = {m: [] for m, _ in modes}
    for i in range(repeat):
        for mode, settings in modes[i % 3 :] + modes[: i % 3]:
            workdir = fresh(run_dir / mode)
            transfers = [
                transfer(server, workdir, lfn, 1 << 20, adler, "/bench/many") for lfn, adler in files
            ]
            await settle()
            times[mode].append(await pilot_stage_in(reactor, server, transfers, workdir, **settings))
            shutil.rmtree(workdir, ignore_errors=True)
    result: dict[str, Any] = {"files": count, "file_mib": 1}
    for mode, _ in modes:
        result[f"{mode}_s"] = round(statistics.median(times[mode]), 3)
    result["parallel_speedup"] = round(result["one_at_a_time_s"] / result["default_s"], 2)
    result["parallel_no_bulk_speedup"] = round(result["one_at_a_time_s"] / result["parallel_no_bulk_s"], 2)
    return result


async def main_async(reactor: Any, args: argparse.Namespace) -> None:
    run_dir = fresh(Path(args.dir).resolve())
    server = await XRootDServer.start()
    try:
        results = {
            "single_file": await single_file(reactor, server, run_dir, args.size_mib << 20, args.repeat),
            "many_files": await many_files(reactor, server, run_dir, args.files, args.repeat),
        }
    finally:
        await server.stop()
    (run_dir.parent / "staging.json").write_text(json.dumps(results, indent=1) + "\n")
    ok = True
    for section, values in results.items():
        sys.stdout.write(f"bench/staging {section}:\n")
        ok = report_values(values, TARGETS, ">=", width=30) and ok
    headline("staging", {**results["single_file"], **results["many_files"]}, list(TARGETS))
    if not ok and args.check_targets:
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.staging", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--dir", default="bench-run/staging")
    add_targets_flag(parser)
    args = parser.parse_args(argv)
    react(lambda reactor: ensureDeferred(main_async(reactor, args)))


if __name__ == "__main__":
    main()
