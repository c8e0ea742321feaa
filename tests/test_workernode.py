"""Worker node description and report: canned /proc files, the real machine, GPU tools, the server.

Canned machines are written as files (``/proc/cpuinfo``, ``/proc/meminfo`` and a
``/sys/devices/system/cpu`` tree) so that ``describe_worker_node`` reads them exactly
as it reads the real ones.  GPU discovery runs real executables (shell scripts called
``nvidia-smi``/``rocm-smi`` printing canned output) first on PATH; the report goes to
the development server over TLS, whose database is then read back.
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import re
from pathlib import Path
from typing import Any

from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface import implementer

from pilot.devserver.server import DevServer, start_dev_server
from pilot.model.credentials import Credentials
from pilot.monitor.gpus import (
    NVIDIA_QUERY,
    ROCM_QUERY,
    Gpu,
    find_gpus,
    group_gpus,
    nvidia_architecture,
    parse_cuda_version,
    parse_nvidia_smi,
    parse_rocm_smi,
)
from pilot.monitor.workernode import WorkerNode, describe_worker_node, report_worker_node, x86_64_level
from pilot.server.api import ApiMode
from pilot.server.client import PandaClient, RetryPolicy, StatusCode
from pilot.server.tls import PilotTLSPolicy

from .fakes import FakeSpawner, Scripted, ScriptedPanda
from .services import missing

reactor: Any = _reactor
QUEUE = "WN_QUEUE"
NO_JITTER = RetryPolicy(attempts=4, initial=2.0, maximum=60.0, jitter=lambda: 0.0)

# -- canned machines -------------------------------------------------------------------------------

#: /proc/cpuinfo flags of an Intel Xeon Gold 6248 (Cascade Lake): AVX-512 F/BW/CD/DQ/VL.
CASCADE_LAKE_FLAGS = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi mmx fxsr sse "
    "sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc art arch_perfmon pebs bts rep_good nopl "
    "xtopology nonstop_tsc cpuid aperfmperf pni pclmulqdq dtes64 monitor ds_cpl vmx smx est tm2 ssse3 sdbg "
    "fma cx16 xtpr pdcm pcid dca sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c "
    "rdrand lahf_lm abm 3dnowprefetch cpuid_fault epb cat_l3 cdp_l3 invpcid_single intel_ppin ssbd mba ibrs "
    "ibpb stibp ibrs_enhanced tpr_shadow vnmi flexpriority ept vpid ept_ad fsgsbase tsc_adjust bmi1 hle avx2 "
    "smep bmi2 erms invpcid cqm mpx rdt_a avx512f avx512dq rdseed adx smap clflushopt clwb intel_pt avx512cd "
    "avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves cqm_llc cqm_occup_llc cqm_mbm_total cqm_mbm_local "
    "dtherm ida arat pln pts pku ospke avx512_vnni md_clear flush_l1d arch_capabilities"
)
#: ... of an Intel Xeon X5650 (Westmere, 2010): SSE4.2 and POPCNT, no AVX.
WESTMERE_FLAGS = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi mmx fxsr sse "
    "sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc arch_perfmon pebs bts rep_good nopl "
    "xtopology nonstop_tsc aperfmperf pni pclmulqdq dtes64 monitor ds_cpl vmx smx est tm2 ssse3 cx16 xtpr "
    "pdcm pcid dca sse4_1 sse4_2 popcnt aes lahf_lm epb dtherm ida arat tpr_shadow vnmi flexpriority ept vpid"
)
#: ... of an Intel Xeon E5-2680 v3 (Haswell).
HASWELL_FLAGS = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht "
    "syscall nx pdpe1gb rdtscp lm constant_tsc pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe "
    "popcnt aes xsave avx f16c rdrand lahf_lm abm fsgsbase bmi1 avx2 smep bmi2 erms invpcid xsaveopt"
)
#: Core ids of a 20-core Cascade Lake die (they have gaps).
XEON_CORE_IDS = (0, 1, 2, 3, 4, 8, 9, 10, 11, 12, 16, 17, 18, 19, 20, 24, 25, 26, 27, 28)


def x86_block(
    n: int, model: str, package: int, core: int, siblings: int, cores: int, mhz: str, flags: str
) -> str:
    return (
        f"processor\t: {n}\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel name\t: {model}\n"
        f"cpu MHz\t\t: {mhz}\ncache size\t: 28160 KB\nphysical id\t: {package}\nsiblings\t: {siblings}\n"
        f"core id\t\t: {core}\ncpu cores\t: {cores}\nfpu\t\t: yes\nflags\t\t: {flags}\n"
        "bogomips\t: 5000.00\naddress sizes\t: 46 bits physical, 48 bits virtual\npower management:\n\n"
    )


def cascade_lake_cpuinfo() -> str:
    """2 sockets x 20 cores x 2 threads, numbered as Linux does (all first threads, then siblings)."""
    model = "Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz"
    blocks = []
    n = 0
    for _thread in range(2):
        for package in range(2):
            for core in XEON_CORE_IDS:
                mhz = "1000.000" if n % 3 else "3100.417"
                blocks.append(x86_block(n, model, package, core, 40, 20, mhz, CASCADE_LAKE_FLAGS))
                n += 1
    return "".join(blocks)


def westmere_cpuinfo() -> str:
    """1 socket x 6 cores, hyper-threading off."""
    model = "Intel(R) Xeon(R) CPU           X5650  @ 2.67GHz"
    return "".join(
        x86_block(n, model, 0, core, 6, 6, "2660.000", WESTMERE_FLAGS)
        for n, core in enumerate((0, 1, 2, 8, 9, 10))
    )


def neoverse_cpuinfo(count: int = 4) -> str:
    """An aarch64 Neoverse-N1 (no topology in cpuinfo, no x86 flags)."""
    block = (
        "processor\t: {n}\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics "
        "fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
        "CPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n"
    )
    return "".join(block.format(n=n) for n in range(count))


MEMINFO = "MemTotal:       395937356 kB\nMemFree:        391000000 kB\nMemAvailable:   392000000 kB\n"


class Machine:
    """A canned machine's /proc and /sys files under a temporary directory."""

    def __init__(self, base: Path, cpuinfo: str, meminfo: str = MEMINFO) -> None:
        base.mkdir(parents=True)
        self.cpuinfo = base / "cpuinfo"
        self.cpuinfo.write_text(cpuinfo)
        self.meminfo = base / "meminfo"
        self.meminfo.write_text(meminfo)
        self.sysfs = base / "sys-cpu"
        self.sysfs.mkdir()

    def max_freq(self, khz: int) -> None:
        cpufreq = self.sysfs / "cpu0" / "cpufreq"
        cpufreq.mkdir(parents=True, exist_ok=True)
        (cpufreq / "cpuinfo_max_freq").write_text(f"{khz}\n")

    def topology(self, pairs: list[tuple[int, int]]) -> None:
        for n, (package, core) in enumerate(pairs):
            directory = self.sysfs / f"cpu{n}" / "topology"
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "physical_package_id").write_text(f"{package}\n")
            (directory / "core_id").write_text(f"{core}\n")

    def describe(self, workdir: Path, machine: str) -> WorkerNode:
        return describe_worker_node(
            workdir,
            site="CERN-PROD",
            panda_queue=QUEUE,
            host_name="slot1@wn042.example.org",
            cpuinfo=self.cpuinfo,
            meminfo=self.meminfo,
            sysfs_cpu=self.sysfs,
            machine=machine,
        )


class LevelTests(SynchronousTestCase):
    """The psABI levels from /proc/cpuinfo flags."""

    def test_known_cpus(self) -> None:
        self.assertEqual(x86_64_level(CASCADE_LAKE_FLAGS.split()), "x86-64-v4")
        self.assertEqual(x86_64_level(HASWELL_FLAGS.split()), "x86-64-v3")
        self.assertEqual(x86_64_level(WESTMERE_FLAGS.split()), "x86-64-v2")

    def test_every_feature_of_a_level_is_needed(self) -> None:
        """One missing feature drops the level: no partial credit, as in glibc's check."""
        haswell = set(HASWELL_FLAGS.split())
        for flag in ("avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"):
            self.assertEqual(x86_64_level(haswell - {flag}), "x86-64-v2", flag)
        for flag in ("cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"):
            self.assertEqual(x86_64_level(haswell - {flag}), "x86-64-v1", flag)
        self.assertEqual(x86_64_level(haswell - {"sse2"}), "")

    def test_avx512_subsets_are_not_v4(self) -> None:
        """Knights Landing has AVX-512 F and CD (plus ER, PF) but not BW, DQ, VL."""
        knl = set(HASWELL_FLAGS.split()) | {"avx512f", "avx512cd", "avx512er", "avx512pf"}
        self.assertEqual(x86_64_level(knl), "x86-64-v3")
        self.assertEqual(x86_64_level(knl | {"avx512bw", "avx512dq", "avx512vl"}), "x86-64-v4")

    def test_levels_are_cumulative(self) -> None:
        """AVX-512 on a CPU that lacks a v3 feature (here MOVBE) is still v2."""
        flags = set(CASCADE_LAKE_FLAGS.split()) - {"movbe"}
        self.assertEqual(x86_64_level(flags), "x86-64-v2")

    def test_not_x86(self) -> None:
        self.assertEqual(x86_64_level("fp asimd evtstrm aes pmull sha1 sha2 crc32".split()), "")
        self.assertEqual(x86_64_level([]), "")


class CannedMachineTests(SynchronousTestCase):
    """``describe_worker_node`` on canned /proc and /sys files."""

    def machine(self, cpuinfo: str) -> Machine:
        return Machine(Path(self.mktemp()), cpuinfo)

    def test_two_socket_hyperthreaded_intel_with_avx512(self) -> None:
        machine = self.machine(cascade_lake_cpuinfo())
        machine.max_freq(3900000)
        node = machine.describe(Path(self.mktemp()), "x86_64")
        self.assertEqual(
            node,
            WorkerNode(
                site="CERN-PROD",
                host_name="slot1@wn042.example.org",
                cpu_model="Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz",
                panda_queue=QUEUE,
                n_logical_cpus=80,
                n_sockets=2,
                cores_per_socket=20,
                threads_per_core=2,
                cpu_architecture="x86_64",
                cpu_architecture_level="x86-64-v4",
                clock_speed=3900.0,
                total_memory=386657,
                total_local_disk=node.total_local_disk,
            ),
        )
        self.assertIsInstance(node.clock_speed, float, "the server's type check wants a float")
        assert node.total_local_disk is not None
        self.assertGreater(node.total_local_disk, 0)

    def test_older_intel_without_avx(self) -> None:
        """Westmere: v2; no cpufreq in /sys (a VM), so ``cpu MHz``; no hyper-threading."""
        machine = self.machine(westmere_cpuinfo())
        node = machine.describe(Path(self.mktemp()), "x86_64")
        self.assertEqual(node.cpu_model, "Intel(R) Xeon(R) CPU X5650 @ 2.67GHz")
        self.assertEqual(node.cpu_architecture_level, "x86-64-v2")
        self.assertEqual(
            (node.n_logical_cpus, node.n_sockets, node.cores_per_socket, node.threads_per_core), (6, 1, 6, 1)
        )
        self.assertEqual(node.clock_speed, 2660.0)
        self.assertIsInstance(node.clock_speed, float)

    def test_aarch64(self) -> None:
        """No level off x86; the model from the MIDR part; topology from /sys when it is there."""
        machine = self.machine(neoverse_cpuinfo(4))
        node = machine.describe(Path(self.mktemp()), "aarch64")
        self.assertEqual(node.cpu_architecture, "aarch64")
        self.assertEqual(node.cpu_architecture_level, "")
        self.assertEqual(node.cpu_model, "ARM Neoverse-N1")
        self.assertEqual(
            (node.n_logical_cpus, node.n_sockets, node.cores_per_socket, node.threads_per_core),
            (4, None, None, None),
        )
        self.assertIsNone(node.clock_speed)
        self.assertNotIn("cpu_architecture_level", node.as_fields(), "an unknown level is not sent")
        machine.topology([(0, 0), (0, 1), (0, 2), (0, 3)])
        machine.max_freq(2500000)
        node = machine.describe(Path(self.mktemp()), "aarch64")
        self.assertEqual(
            (node.n_logical_cpus, node.n_sockets, node.cores_per_socket, node.threads_per_core), (4, 1, 4, 1)
        )
        self.assertEqual(node.clock_speed, 2500.0)

    def test_flags_common_to_every_cpu(self) -> None:
        """A level must hold on every CPU the payload may be scheduled on."""
        text = cascade_lake_cpuinfo().replace(f"flags\t\t: {CASCADE_LAKE_FLAGS}\nbogomips", "XX", 1)
        text = text.replace("XX", f"flags\t\t: {HASWELL_FLAGS}\nbogomips", 1)
        node = self.machine(text).describe(Path(self.mktemp()), "x86_64")
        self.assertEqual(node.cpu_architecture_level, "x86-64-v3")

    def test_unreadable_files_leave_values_unknown(self) -> None:
        missing = Path(self.mktemp())
        node = describe_worker_node(
            missing / "work",
            site="S",
            cpuinfo=missing / "cpuinfo",
            meminfo=missing / "meminfo",
            sysfs_cpu=missing / "sys",
            machine="x86_64",
        )
        self.assertEqual(node.cpu_model, "unknown")
        self.assertEqual(node.n_logical_cpus, os.cpu_count())
        self.assertEqual((node.n_sockets, node.clock_speed, node.total_memory), (None, None, None))
        self.assertEqual(node.cpu_architecture_level, "")
        self.assertIsNotNone(node.total_local_disk, "the nearest existing parent's file system")

    def test_fields_on_the_wire(self) -> None:
        node = WorkerNode(site="S", host_name="h", cpu_model="m", n_logical_cpus=8, clock_speed=2400.0)
        self.assertEqual(
            node.as_fields(),
            {"site": "S", "host_name": "h", "cpu_model": "m", "n_logical_cpus": 8, "clock_speed": 2400.0},
        )
        gpu = Gpu(vendor="NVIDIA", model="Tesla T4", count=2, vram=15360, framework="CUDA")
        self.assertEqual(
            gpu.as_fields(node.site, node.host_name),
            {
                "site": "S",
                "host_name": "h",
                "vendor": "NVIDIA",
                "model": "Tesla T4",
                "count": 2,
                "vram": 15360,
                "framework": "CUDA",
            },
        )


#: CI runs on Debian 12 (glibc 2.36), whose loader lists the x86-64 levels it supports.
GLIBC_HINT = "CI runs on Debian 12 or later"


class RealMachineTests(TestCase):
    """This machine, checked against what glibc's dynamic loader says about it."""

    async def test_this_machine(self) -> None:
        workdir = Path(self.mktemp())
        node = describe_worker_node(workdir, site="S")
        self.assertEqual(node.cpu_architecture, platform.machine())
        self.assertEqual(node.host_name, platform.node())
        assert node.n_logical_cpus is not None and node.total_memory is not None
        self.assertGreaterEqual(node.n_logical_cpus, 1)
        self.assertGreater(node.total_memory, 0)
        self.assertGreater(node.total_local_disk or 0, 0)
        self.assertNotEqual(node.cpu_model, "unknown")
        if node.n_sockets is not None:
            assert node.cores_per_socket is not None and node.threads_per_core is not None
            self.assertEqual(
                node.n_sockets * node.cores_per_socket * node.threads_per_core, node.n_logical_cpus
            )
        if platform.machine() != "x86_64":
            self.assertEqual(node.cpu_architecture_level, "")
            return
        loader = next(
            (
                p
                for p in ("/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
                if os.access(p, os.X_OK)
            ),
            None,
        )
        if loader is None:
            missing("a glibc x86-64 loader to compare with", GLIBC_HINT)
        out, _, code = await getProcessOutputAndValue(loader, ("--help",), env={}, reactor=reactor)
        text = out.decode()
        if code != 0 or "glibc-hwcaps" not in text:
            missing("a glibc that prints its hwcaps levels (glibc >= 2.33)", GLIBC_HINT)
        supported = re.findall(r"^\s+(x86-64-v\d) \(supported", text, re.MULTILINE)
        self.assertEqual(node.cpu_architecture_level, max(supported, default="x86-64-v1"))


# -- GPUs ----------------------------------------------------------------------------------------

NVIDIA_CSV = (
    "NVIDIA A100-SXM4-80GB, 81920, 535.129.03\n"
    "NVIDIA A100-SXM4-80GB, 81920, 535.129.03\n"
    "Tesla T4, 15360, 535.129.03\n"
    "NVIDIA A100-SXM4-80GB, 81920, 535.129.03\n"
)
NVIDIA_HEADER = (
    "+---------------------------------------------------------------------------------------+\n"
    "| NVIDIA-SMI 535.129.03             Driver Version: 535.129.03   CUDA Version: 12.2     |\n"
    "|-----------------------------------------+----------------------+----------------------+\n"
)
ROCM_JSON = json.dumps(
    {
        "card0": {
            "Card series": "AMD Instinct MI250X",
            "Card model": "0x740c",
            "GFX Version": "gfx90a",
            "VRAM Total Memory (B)": "68702699520",
            "VRAM Total Used Memory (B)": "10960896",
        },
        "card1": {
            "Card series": "AMD Instinct MI250X",
            "Card model": "0x740c",
            "GFX Version": "gfx90a",
            "VRAM Total Memory (B)": "68702699520",
            "VRAM Total Used Memory (B)": "10960896",
        },
        "system": {"Driver version": "6.3.6"},
    }
)
A100 = Gpu(
    vendor="NVIDIA",
    model="NVIDIA A100-SXM4-80GB",
    count=3,
    vram=81920,
    architecture="Ampere",
    framework="CUDA",
    framework_version="12.2",
    driver_version="535.129.03",
)
T4 = Gpu(
    vendor="NVIDIA",
    model="Tesla T4",
    count=1,
    vram=15360,
    architecture="Turing",
    framework="CUDA",
    framework_version="12.2",
    driver_version="535.129.03",
)
MI250X = Gpu(
    vendor="AMD",
    model="AMD Instinct MI250X",
    count=2,
    vram=65520,
    architecture="gfx90a",
    framework="ROCm",
    driver_version="6.3.6",
)


class GpuParsingTests(SynchronousTestCase):
    def test_nvidia_smi_grouped_by_model(self) -> None:
        self.assertEqual(parse_nvidia_smi(NVIDIA_CSV, "12.2"), [A100, T4])

    def test_nvidia_smi_odd_values(self) -> None:
        gpus = parse_nvidia_smi("NVIDIA H100 80GB HBM3, [N/A], [N/A]\n\nNo devices were found\n")
        self.assertEqual(
            gpus,
            [
                Gpu(
                    vendor="NVIDIA",
                    model="NVIDIA H100 80GB HBM3",
                    count=1,
                    architecture="Hopper",
                    framework="CUDA",
                )
            ],
        )

    def test_cuda_version(self) -> None:
        self.assertEqual(parse_cuda_version(NVIDIA_HEADER), "12.2")
        self.assertEqual(parse_cuda_version("| KMD Version: 610.43.02   CUDA UMD Version: 13.3 |"), "13.3")
        self.assertEqual(parse_cuda_version("CUDA Version                       : 12.4\n"), "12.4")
        self.assertIsNone(parse_cuda_version("NVIDIA-SMI has failed"))

    def test_architectures(self) -> None:
        cases = {
            "NVIDIA A100-SXM4-40GB": "Ampere",
            "NVIDIA A10": "Ampere",
            "NVIDIA L40S": "Ada Lovelace",
            "NVIDIA L4": "Ada Lovelace",
            "NVIDIA GH200 480GB": "Grace Hopper",
            "NVIDIA H100 PCIe": "Hopper",
            "Tesla V100-SXM2-16GB": "Volta",
            "Tesla P100-PCIE-12GB": "Pascal",
            "Tesla K80": "Kepler",
            "NVIDIA GeForce RTX 4090": "Ada Lovelace",
            "NVIDIA GeForce RTX 3080": "Ampere",
        }
        for model, architecture in cases.items():
            self.assertEqual(nvidia_architecture(model), architecture, model)
        self.assertIsNone(nvidia_architecture("NVIDIA Something New"))

    def test_rocm_smi(self) -> None:
        self.assertEqual(parse_rocm_smi(ROCM_JSON), [MI250X])
        self.assertEqual(parse_rocm_smi("not json"), [])
        self.assertEqual(parse_rocm_smi("[]"), [])

    def test_grouping_keeps_differences(self) -> None:
        other_driver = Gpu(vendor="NVIDIA", model="Tesla T4", count=1, driver_version="550.54.14")
        self.assertEqual(
            group_gpus([T4, other_driver, T4]), [Gpu(**{**T4.__dict__, "count": 2}), other_driver]
        )


def fake_tool(directory: Path, name: str, script: str) -> Path:
    """A real executable ``name`` in ``directory`` running ``script`` (POSIX sh)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return path


NVIDIA_SMI_SCRIPT = f"""\
printf '%s' "$WN_TEST_MARK" > "$(dirname "$0")/env-seen"
if [ "$1" = "{NVIDIA_QUERY[0]}" ] && [ "$2" = "{NVIDIA_QUERY[1]}" ]; then
cat <<'EOF'
{NVIDIA_CSV}EOF
exit 0
fi
if [ "$#" -eq 0 ]; then
cat <<'EOF'
{NVIDIA_HEADER}EOF
exit 0
fi
echo "unexpected arguments: $*" >&2
exit 2
"""


class FakeToolSpawnTests(SynchronousTestCase):
    """What is spawned, and what a tool that fails or hangs gives, with a fake spawner and clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.spawner = FakeSpawner(self.clock)
        self.bin = Path(self.mktemp())
        fake_tool(self.bin, "nvidia-smi", "exit 0\n")
        self.env = {"PATH": f"{self.bin}:/usr/bin:/bin"}

    def test_not_on_path_nothing_spawned(self) -> None:
        gpus = self.successResultOf(
            Deferred.fromCoroutine(
                find_gpus(self.spawner, {"PATH": str(Path(self.mktemp()))}, clock=self.clock)
            )
        )
        self.assertEqual((gpus, self.spawner.processes), ([], []))

    def test_query_then_header_with_the_given_environment(self) -> None:
        d = Deferred.fromCoroutine(find_gpus(self.spawner, self.env, clock=self.clock))
        (query,) = self.spawner.processes
        self.assertEqual(query.args, [str(self.bin / "nvidia-smi"), *NVIDIA_QUERY])
        self.assertEqual(query.env, self.env)
        query.protocol.childDataReceived(1, NVIDIA_CSV.encode())
        query.end(0)
        header = self.spawner.processes[1]
        self.assertEqual(header.args, [str(self.bin / "nvidia-smi")])
        header.protocol.childDataReceived(1, NVIDIA_HEADER.encode())
        header.end(0)
        self.assertEqual(self.successResultOf(d), [A100, T4])

    def test_failures_give_no_gpu(self) -> None:
        for ending in ({"exit_code": 9}, {"signal": 9}):
            d = Deferred.fromCoroutine(find_gpus(self.spawner, self.env, clock=self.clock))
            process = self.spawner.processes[-1]
            process.protocol.childDataReceived(1, NVIDIA_CSV.encode())
            process.end(**ending)
            self.assertEqual(self.successResultOf(d), [], ending)

    def test_a_hanging_tool_is_given_up(self) -> None:
        d = Deferred.fromCoroutine(find_gpus(self.spawner, self.env, clock=self.clock, timeout=30.0))
        self.clock.advance(29)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(d), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class RealToolTests(TestCase):
    """Real processes: fake ``nvidia-smi``/``rocm-smi`` scripts first on PATH."""

    async def test_nvidia_and_amd(self) -> None:
        tools = Path(self.mktemp())
        fake_tool(tools, "nvidia-smi", NVIDIA_SMI_SCRIPT)
        fake_tool(
            tools,
            "rocm-smi",
            f'[ "$*" = "{" ".join(ROCM_QUERY)}" ] || exit 2\ncat <<\'EOF\'\n{ROCM_JSON}\nEOF\n',
        )
        env = {"PATH": f"{tools}:/usr/bin:/bin", "WN_TEST_MARK": "explicit-env"}
        gpus = await find_gpus(reactor, env)
        self.assertEqual(gpus, [A100, T4, MI250X])
        self.assertEqual((tools / "env-seen").read_text(), "explicit-env")

    async def test_broken_driver(self) -> None:
        tools = Path(self.mktemp())
        fake_tool(
            tools,
            "nvidia-smi",
            'echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver."\nexit 9\n',
        )
        self.assertEqual(await find_gpus(reactor, {"PATH": f"{tools}:/usr/bin:/bin"}), [])


# -- the report ----------------------------------------------------------------------------------

NODE = WorkerNode(
    site="CERN-PROD",
    host_name="slot3@wn042.example.org",
    cpu_model="Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz",
    panda_queue=QUEUE,
    n_logical_cpus=80,
    n_sockets=2,
    cores_per_socket=20,
    threads_per_core=2,
    cpu_architecture="x86_64",
    cpu_architecture_level="x86-64-v4",
    clock_speed=3900.0,
    total_memory=386657,
    total_local_disk=1788,
)


@implementer(ILogObserver)
class _Recorder:
    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)


def capture_logs(test: SynchronousTestCase) -> list[LogEvent]:
    """Every log event emitted until the test ends."""
    recorder = _Recorder()
    globalLogPublisher.addObserver(recorder)
    test.addCleanup(globalLogPublisher.removeObserver, recorder)
    return recorder.events


def workernode_events(events: list[LogEvent]) -> list[str]:
    """The ``event`` types this module logged (its one-line outcomes)."""
    return [str(e["event"]) for e in events if str(e.get("event", "")).startswith("workernode.")]


class ReportAgainstDevServerTests(TestCase):
    """The reports over TLS to the development server, which stores them."""

    timeout = 60

    async def server(self, **kwargs: Any) -> DevServer:
        server = await start_dev_server(reactor, Path(self.mktemp()), queues={QUEUE: {}}, **kwargs)
        self.addCleanup(lambda: Deferred.fromCoroutine(server.stop()))
        return server

    def client(self, server: DevServer, api: ApiMode = ApiMode.AUTO) -> PandaClient:
        credentials = Credentials(cacert=server.pki.ca_cert, proxy=server.pki.client_proxy)
        pool = HTTPConnectionPool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        agent = Agent(reactor, contextFactory=PilotTLSPolicy(credentials), pool=pool)
        return PandaClient(
            HTTPClient(agent), server.url, reactor, api=api, retry=RetryPolicy(attempts=2, initial=0.1)
        )

    async def test_round_trip(self) -> None:
        server = await self.server()
        logged = capture_logs(self)
        self.assertTrue(await report_worker_node(self.client(server), NODE, [A100, T4]))
        (stored,) = await server.worker_nodes()
        expected = dict(NODE.as_fields(), host_name="wn042.example.org")
        self.assertEqual({key: stored[key] for key in expected}, expected)
        self.assertIsInstance(stored["clock_speed"], float)
        gpus = await server.worker_node_gpus()
        self.assertEqual(
            [(g["host_name"], g["model"], g["count"], g["vram"], g["framework_version"]) for g in gpus],
            [
                ("wn042.example.org", "NVIDIA A100-SXM4-80GB", 3, 81920, "12.2"),
                ("wn042.example.org", "Tesla T4", 1, 15360, "12.2"),
            ],
        )
        sent = server.request_log.last("/api/v1/pilot/update_worker_node")
        self.assertEqual((sent.status, sent.header("Content-Type")), (200, "application/json"))
        self.assertEqual(json.loads(gzip.decompress(sent.body)), NODE.as_fields())
        self.assertEqual(json.loads(sent.reply_body)["message"], "Inserted new worker node.")
        self.assertEqual(workernode_events(logged), ["workernode.reported"])
        # the same node again: a refresh, not a second node
        self.assertTrue(await report_worker_node(self.client(server), NODE, []))
        self.assertEqual(len(await server.worker_nodes()), 1)

    async def test_legacy_client_sends_nothing(self) -> None:
        server = await self.server()
        logged = capture_logs(self)
        self.assertFalse(await report_worker_node(self.client(server, ApiMode.LEGACY), NODE, [A100]))
        self.assertEqual(server.request_log.matching("/api/v1/pilot/update_worker_node"), [])
        self.assertEqual(await server.worker_nodes(), [])
        self.assertEqual(workernode_events(logged), ["workernode.unsupported"])

    async def test_refused_without_production_role(self) -> None:
        server = await self.server(production_dns=[])
        logged = capture_logs(self)
        client = self.client(server)
        result = await client.update_worker_node(NODE.as_fields())
        self.assertEqual(
            (result.status, result.message), (StatusCode.ROLE, "production or pilot role required")
        )
        self.assertFalse(await report_worker_node(client, NODE, [A100]))
        self.assertEqual(len(server.request_log.matching("/api/v1/pilot/update_worker_node_gpu")), 0)
        self.assertEqual(workernode_events(logged), ["workernode.report_refused"])

    async def test_server_type_check(self) -> None:
        """The server refuses an int clock speed: why ``WorkerNode`` keeps it a float."""
        server = await self.server()
        fields = dict(NODE.as_fields(), clock_speed=3900)
        result = await self.client(server).update_worker_node(fields)
        self.assertFalse(result.accepted)
        self.assertEqual(result.message, "Type error: 'clock_speed' must be of type float, got int.")


class ReportFailureTests(SynchronousTestCase):
    """Servers that lack the methods or fail, with a scripted server and a clock."""

    def client(self, server: ScriptedPanda, clock: Clock) -> PandaClient:
        return PandaClient(StubTreq(server), "https://panda.example.org", clock, retry=NO_JITTER)  # type: ignore[arg-type]

    def test_legacy_only_server(self) -> None:
        """403 ``method ... is forbidden``: False, and an AUTO client stays on v1 for the job calls."""
        clock = Clock()
        server = ScriptedPanda(clock, legacy_only=True)
        client = self.client(server, clock)
        logged = capture_logs(self)
        self.assertFalse(self.successResultOf(Deferred.fromCoroutine(report_worker_node(client, NODE, [T4]))))
        self.assertEqual([c.path for c in server.calls], ["/api/v1/pilot/update_worker_node"])
        self.assertEqual(client.api, ApiMode.V1)
        self.assertEqual(workernode_events(logged), ["workernode.unsupported"])

    def test_unavailable_server_limited_retries(self) -> None:
        clock = Clock()
        server = ScriptedPanda(clock)
        server.scripted = [Scripted(503, b"busy", "text/plain")] * 5
        logged = capture_logs(self)
        d = Deferred.fromCoroutine(report_worker_node(self.client(server, clock), NODE, [T4]))
        clock.advance(2.0)
        self.assertFalse(self.successResultOf(d))
        self.assertEqual(len(server.calls), 2, "two attempts, not the job calls' four")
        self.assertEqual(workernode_events(logged), ["workernode.report_failed"])

    def test_gpu_refused_after_node_accepted(self) -> None:
        clock = Clock()
        server = ScriptedPanda(clock)
        ok = json.dumps({"success": True, "message": "Inserted new worker node.", "data": None}).encode()
        bad = json.dumps(
            {"success": False, "message": "Worker node GPU update failed", "data": None}
        ).encode()
        server.scripted = [Scripted(200, ok), Scripted(200, bad)]
        d = Deferred.fromCoroutine(report_worker_node(self.client(server, clock), NODE, [T4, A100]))
        self.assertFalse(self.successResultOf(d))
        self.assertEqual(
            [c.path for c in server.calls],
            ["/api/v1/pilot/update_worker_node", "/api/v1/pilot/update_worker_node_gpu"],
        )
        self.assertEqual(
            json.loads(gzip.decompress(server.calls[1].body)), T4.as_fields(NODE.site, NODE.host_name)
        )
