"""What this worker node is: CPU, memory, disk and GPUs, reported once to the PanDA server.

The server keeps a map of the worker nodes of each site (``update_worker_node`` and
``update_worker_node_gpu``, v1 API only) that brokerage uses to match tasks needing a
CPU micro-architecture level or a GPU model to the queues that have them.  pilot3
sends both reports at start-up; so do we.  Nothing about a job depends on them, so a
server without these methods (the legacy API), or one that refuses or fails them,
costs one log line and nothing else.

* ``describe_worker_node`` reads ``/proc/cpuinfo``, ``/proc/meminfo``, the CPU
  frequency limits in ``/sys`` and the work directory's file system.  It is plain
  synchronous file reading, meant to run in a thread (``deferToThreadPool``).
* ``find_gpus`` (``pilot.monitor.gpus``) asks ``nvidia-smi`` (and ``rocm-smi``) through
  the reactor, only when they are on the ``PATH`` the payloads will get.
* ``report_worker_node`` sends what was found, once, without raising for server errors.

The x86-64 micro-architecture level follows the psABI level definitions, checked
the way glibc does it (``sysdeps/x86/get-isa-level.h``; ``ld.so --help`` prints the
verdict under "Subdirectories of glibc-hwcaps directories"), with the CPUID features
spelled as Linux names them in ``/proc/cpuinfo``:

========== ============================================================================
level      features (psABI name → /proc/cpuinfo flag where they differ)
========== ============================================================================
x86-64-v1  CMOV CX8 FPU FXSR MMX SSE SSE2
x86-64-v2  CMPXCHG16B→cx16 LAHF-SAHF→lahf_lm POPCNT SSE3→pni SSE4_1 SSE4_2 SSSE3
x86-64-v3  AVX AVX2 BMI1 BMI2 F16C FMA LZCNT→abm MOVBE OSXSAVE→xsave
x86-64-v4  AVX512F AVX512BW AVX512CD AVX512DQ AVX512VL
========== ============================================================================

The psABI baseline also names OSFXSR and SCE (SYSCALL); like glibc we do not check
them: Linux does not show OSFXSR, and no 64-bit kernel runs without either.  Nor does
Linux show OSXSAVE, but it drops ``xsave`` (and with it ``avx``...) when the kernel
does not enable XSAVE, so ``xsave`` stands for it.  A level needs every feature of the
levels below it; a CPU that is not x86-64 has no level (``""``).
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from pilot.logs import pilot_observer
from pilot.monitor.gpus import Gpu
from pilot.server.client import MethodNotFound, PandaClient, ServerError
from pilot.util.records import record

log = Logger(observer=pilot_observer)


# -- what is reported ------------------------------------------------------------------------------


@record(frozen=True)
class WorkerNode:
    """The parameters of ``update_worker_node`` (sizes in MB and GB, clock speed in MHz).

    ``None`` (and an empty level) means "not known" and is not sent.  The types are the
    ones the server's type check demands: ``clock_speed`` must be a float even when it
    is a whole number, the counts and sizes ints.
    """

    site: str
    host_name: str
    cpu_model: str
    panda_queue: str | None = None
    n_logical_cpus: int | None = None
    n_sockets: int | None = None
    cores_per_socket: int | None = None
    threads_per_core: int | None = None
    cpu_architecture: str | None = None
    cpu_architecture_level: str = ""
    clock_speed: float | None = None
    total_memory: int | None = None
    total_local_disk: int | None = None

    def as_fields(self) -> dict[str, Any]:
        """The request parameters: the known values only, with their exact types."""
        return _known({f.name: getattr(self, f.name) for f in fields(self)})


def _known(values: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None and value != ""}


# -- the CPU, memory and disk ------------------------------------------------------------------------


#: psABI micro-architecture levels, lowest first, as /proc/cpuinfo flags (see the module docstring).
X86_64_LEVELS: tuple[tuple[str, frozenset[str]], ...] = (
    ("x86-64-v1", frozenset({"cmov", "cx8", "fpu", "fxsr", "mmx", "sse", "sse2"})),
    ("x86-64-v2", frozenset({"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"})),
    (
        "x86-64-v3",
        frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}),
    ),
    ("x86-64-v4", frozenset({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"})),
)


def x86_64_level(flags: Iterable[str]) -> str:
    """The highest psABI level whose features (and those of every lower level) are all in ``flags``.

    ``""`` when even the baseline is incomplete: flags that are not an x86-64 CPU's.
    """
    present = set(flags)
    level = ""
    for name, required in X86_64_LEVELS:
        if not required <= present:
            break
        level = name
    return level


def parse_cpuinfo(text: str) -> list[dict[str, str]]:
    """``/proc/cpuinfo`` as one ``{field: value}`` per logical CPU (blank-line separated blocks)."""
    processors: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                processors.append(current)
                current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current.setdefault(key.strip(), value.strip())
    if current:
        processors.append(current)
    # aarch64 kernels add a trailing block with machine-wide fields (no "processor")
    return [cpu for cpu in processors if "processor" in cpu]


@record(frozen=True)
class Topology:
    """Logical CPUs and, when the kernel says, how they are arranged."""

    logical: int
    sockets: int | None = None
    cores_per_socket: int | None = None
    threads_per_core: int | None = None


def topology(processors: Sequence[Mapping[str, str]], sysfs_cpu: Path) -> Topology:
    """Sockets, cores and threads from ``physical id``/``core id`` pairs.

    x86 kernels put the ids in ``/proc/cpuinfo``; other architectures only in
    ``/sys/devices/system/cpu/cpuN/topology``, which is read as the fallback.  Distinct
    (socket, core) pairs count the physical cores even when core ids have gaps, as
    they do on most Xeons.  ``siblings``/``cpu cores`` stand in for missing core ids.
    """
    logical = len(processors) or os.cpu_count() or 0
    ids = [(cpu.get("physical id"), cpu.get("core id")) for cpu in processors]
    if ids and all(package is not None for package, _ in ids):
        sockets = len({package for package, _ in ids})
        if all(core is not None for _, core in ids):
            return _arranged(logical, sockets, len(set(ids)))
        first = processors[0]
        cores, siblings = _int(first.get("cpu cores")), _int(first.get("siblings"))
        if cores and siblings and siblings % cores == 0:
            return Topology(logical, sockets, cores, siblings // cores)
        return Topology(logical, sockets)
    sysfs = _sysfs_topology(sysfs_cpu)
    if sysfs is not None and len(sysfs) == logical:
        return _arranged(logical, len({package for package, _ in sysfs}), len(set(sysfs)))
    return Topology(logical)


def _arranged(logical: int, sockets: int, cores: int) -> Topology:
    if not sockets or not cores or cores % sockets or logical % cores:
        return Topology(logical, sockets or None)
    return Topology(logical, sockets, cores // sockets, logical // cores)


def _sysfs_topology(sysfs_cpu: Path) -> list[tuple[int, int]] | None:
    pairs = []
    try:
        for entry in sysfs_cpu.iterdir():
            if not re.fullmatch(r"cpu\d+", entry.name):
                continue
            package = _read_int(entry / "topology" / "physical_package_id")
            core = _read_int(entry / "topology" / "core_id")
            if package is None or core is None:
                return None
            pairs.append((max(package, 0), core))  # -1: a package id the firmware did not give
    except OSError:
        return None
    return pairs or None


def cpu_model(processors: Sequence[Mapping[str, str]]) -> str:
    """The CPU's name: ``model name`` (x86), ``cpu`` (POWER), or the ARM implementer and part."""
    first = processors[0] if processors else {}
    for key in ("model name", "cpu model", "cpu"):
        if first.get(key):
            return " ".join(first[key].split())
    implementer, part = first.get("CPU implementer", "").lower(), first.get("CPU part", "").lower()
    if implementer and part:
        known = _ARM_PARTS.get((implementer, part))
        if known is not None:
            return known
        vendor = _ARM_IMPLEMENTERS.get(implementer, f"implementer {implementer}")
        return f"{vendor} part {part}"
    return "unknown"


#: The commonest server ARM cores (MIDR implementer, part), as ``lscpu`` names them.
_ARM_PARTS: dict[tuple[str, str], str] = {
    ("0x41", "0xd08"): "ARM Cortex-A72",
    ("0x41", "0xd0c"): "ARM Neoverse-N1",
    ("0x41", "0xd40"): "ARM Neoverse-V1",
    ("0x41", "0xd49"): "ARM Neoverse-N2",
    ("0x41", "0xd4f"): "ARM Neoverse-V2",
    ("0x46", "0x001"): "Fujitsu A64FX",
    ("0x48", "0xd01"): "HiSilicon Kunpeng-920",
    ("0xc0", "0xac3"): "Ampere Ampere-1",
    ("0xc0", "0xac4"): "Ampere Ampere-1a",
}
_ARM_IMPLEMENTERS = {
    "0x41": "ARM",
    "0x46": "Fujitsu",
    "0x48": "HiSilicon",
    "0x4e": "NVIDIA",
    "0xc0": "Ampere",
}


def clock_speed(processors: Sequence[Mapping[str, str]], sysfs_cpu: Path) -> float | None:
    """The CPU's maximum frequency in MHz, from cpufreq; else the highest ``cpu MHz``.

    ``cpu MHz`` is the frequency of the moment, which moves with load and power saving,
    so two pilots on one node would report different values; cpufreq's maximum does not.
    """
    khz = _read_int(sysfs_cpu / "cpu0" / "cpufreq" / "cpuinfo_max_freq")
    if khz is not None and khz > 0:
        return khz / 1000.0
    speeds = [speed for cpu in processors if (speed := _float(cpu.get("cpu MHz"))) is not None]
    return round(max(speeds), 3) if speeds else None


def total_memory_mb(meminfo: Path) -> int | None:
    """``MemTotal`` of ``/proc/meminfo`` in MB (MiB, as pilot3 and the server count them)."""
    try:
        text = meminfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    match = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(match.group(1)) // 1024 if match else None


def total_disk_gb(path: Path) -> int | None:
    """Size in GB (GiB) of the file system holding ``path`` (or its nearest existing parent)."""
    for candidate in (path, *path.absolute().parents):
        try:
            stat = os.statvfs(candidate)
        except FileNotFoundError:
            continue
        except OSError:
            return None
        return stat.f_blocks * stat.f_frsize // 1024**3
    return None


def describe_worker_node(
    workdir: Path,
    *,
    site: str,
    panda_queue: str | None = None,
    host_name: str | None = None,
    cpuinfo: Path = Path("/proc/cpuinfo"),
    meminfo: Path = Path("/proc/meminfo"),
    sysfs_cpu: Path = Path("/sys/devices/system/cpu"),
    machine: str | None = None,
) -> WorkerNode:
    """Describe this node for ``update_worker_node``.  Blocking file reads: run it in a thread.

    ``site`` is the queue's site (``PQ.resource``), not the queue.  ``host_name``
    defaults to the kernel's node name and ``machine`` to ``platform.machine()``; the
    paths are parameters so that tests can describe canned machines.  What cannot be
    read is left unknown rather than failing: the report is informational.
    """
    try:
        processors = parse_cpuinfo(cpuinfo.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        processors = []
    arch = machine if machine is not None else platform.machine()
    shape = topology(processors, sysfs_cpu)
    level = ""
    if arch in ("x86_64", "amd64", "AMD64") and processors:
        common = set.intersection(*(set(cpu.get("flags", "").split()) for cpu in processors))
        level = x86_64_level(common)
    return WorkerNode(
        site=site,
        host_name=host_name or platform.node() or "localhost",
        cpu_model=cpu_model(processors),
        panda_queue=panda_queue,
        n_logical_cpus=shape.logical or None,
        n_sockets=shape.sockets,
        cores_per_socket=shape.cores_per_socket,
        threads_per_core=shape.threads_per_core,
        cpu_architecture=arch or None,
        cpu_architecture_level=level,
        clock_speed=clock_speed(processors, sysfs_cpu),
        total_memory=total_memory_mb(meminfo),
        total_local_disk=total_disk_gb(workdir),
    )


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _read_int(path: Path) -> int | None:
    try:
        return _int(path.read_text(encoding="ascii").strip())
    except (OSError, UnicodeDecodeError):
        return None


# -- reporting ---------------------------------------------------------------------------------------


async def report_worker_node(client: PandaClient, node: WorkerNode, gpus: Sequence[Gpu]) -> bool:
    """Send the node and its GPUs once; True if the server took every report.

    Never raises for what the server does: a server without these methods (legacy API,
    403/404) is logged in one line at info level, a refusal or a failed exchange in one
    line at warning level, and the result is False.  The pilot goes on either way.
    """
    calls = [("update_worker_node", client.update_worker_node, node.as_fields())]
    calls += [
        ("update_worker_node_gpu", client.update_worker_node_gpu, gpu.as_fields(node.site, node.host_name))
        for gpu in gpus
    ]
    for method, call, values in calls:
        try:
            result = await call(values)
        except MethodNotFound as exc:
            log.info(
                "worker node not reported: the server has no {method} ({reason})",
                method=method,
                reason=str(exc),
                event="workernode.unsupported",
            )
            return False
        except ServerError as exc:
            log.warn(
                "worker node not reported: {method} failed: {reason}",
                method=method,
                reason=str(exc),
                event="workernode.report_failed",
            )
            return False
        if not result.accepted:
            log.warn(
                "worker node not reported: {method} refused: {message} (StatusCode {status})",
                method=method,
                message=result.message,
                status=int(result.status),
                event="workernode.report_refused",
            )
            return False
    log.info(
        "worker node {host} reported: {model}, {cpus} CPUs, level {cpu_level}, {ngpus} GPU model(s)",
        host=node.host_name,
        model=node.cpu_model,
        cpus=node.n_logical_cpus,
        cpu_level=node.cpu_architecture_level or "n/a",
        ngpus=len(gpus),
        event="workernode.reported",
    )
    return True
