"""The worker node's GPUs: asked of ``nvidia-smi`` and ``rocm-smi``, grouped by model.

The tools are run through the reactor (never blocking it), only when they are on the
``PATH`` the payloads will get, and each is bounded by ``GPU_TOOL_TIMEOUT``: a hung
driver must not delay the pilot.  What they print is parsed into ``Gpu`` records, one
per model with its count, for ``update_worker_node_gpu`` (``pilot.monitor.workernode``).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields, replace
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger
from twisted.python.failure import Failure

from pilot.logs import pilot_observer
from pilot.util.records import record

log = Logger(observer=pilot_observer)

#: How long a GPU tool may take before the node is reported without GPUs.
GPU_TOOL_TIMEOUT = 60.0


@record(frozen=True)
class Gpu:
    """One GPU model of the node and how many of it there are (``update_worker_node_gpu``).

    ``vram`` is in MB; ``framework`` is ``CUDA`` or ``ROCm``.  The site and host name
    come from the ``WorkerNode`` the GPUs are reported with.
    """

    vendor: str
    model: str
    count: int
    vram: int | None = None
    architecture: str | None = None
    framework: str | None = None
    framework_version: str | None = None
    driver_version: str | None = None

    def as_fields(self, site: str, host_name: str) -> dict[str, Any]:
        """The request parameters for this GPU model on the node ``host_name`` of ``site``."""
        values: dict[str, Any] = {"site": site, "host_name": host_name}
        values.update({f.name: getattr(self, f.name) for f in fields(self)})
        return {key: value for key, value in values.items() if value is not None and value != ""}


# -- GPUs ------------------------------------------------------------------------------------------


NVIDIA_QUERY = ("--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits")
ROCM_QUERY = ("--showproductname", "--showmeminfo", "vram", "--showdriverversion", "--json")

#: NVIDIA model-name tokens → architecture, most specific first (nvidia-smi names no architecture).
_NVIDIA_ARCHITECTURES: tuple[tuple[str, str], ...] = (
    ("GB200", "Blackwell"),
    ("GH200", "Grace Hopper"),
    ("B200", "Blackwell"),
    ("B100", "Blackwell"),
    ("H200", "Hopper"),
    ("H100", "Hopper"),
    ("H800", "Hopper"),
    ("L40", "Ada Lovelace"),
    ("L4", "Ada Lovelace"),
    ("RTX 40", "Ada Lovelace"),
    ("RTX 6000 Ada", "Ada Lovelace"),
    ("A100", "Ampere"),
    ("A800", "Ampere"),
    ("A40", "Ampere"),
    ("A30", "Ampere"),
    ("A10", "Ampere"),
    ("A16", "Ampere"),
    ("RTX A", "Ampere"),
    ("RTX 30", "Ampere"),
    ("T4", "Turing"),
    ("RTX 20", "Turing"),
    ("V100", "Volta"),
    ("P100", "Pascal"),
    ("P40", "Pascal"),
    ("P4", "Pascal"),
    ("K80", "Kepler"),
    ("K40", "Kepler"),
)


def nvidia_architecture(model: str) -> str | None:
    """The architecture of an NVIDIA GPU model name (``None`` if not in the table)."""
    for token, architecture in _NVIDIA_ARCHITECTURES:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(token)}", model):
            return architecture
    return None


def parse_nvidia_smi(output: str, cuda_version: str | None = None) -> list[Gpu]:
    """``nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader,nounits``."""
    found = []
    import csv  # only nodes with NVIDIA GPUs need it

    for row in csv.reader(io.StringIO(output), skipinitialspace=True):
        if len(row) != 3 or not row[0].strip():
            continue
        name, vram, driver = (cell.strip() for cell in row)
        found.append(
            Gpu(
                vendor="NVIDIA",
                model=name,
                count=1,
                vram=_int(vram),
                architecture=nvidia_architecture(name),
                framework="CUDA",
                framework_version=cuda_version,
                driver_version=driver if driver and not driver.startswith("[") else None,
            )
        )
    return group_gpus(found)


def parse_cuda_version(output: str) -> str | None:
    """The CUDA version in ``nvidia-smi`` (``CUDA Version: 12.2``) or ``--version`` output."""
    match = re.search(r"CUDA[A-Za-z ]*Version\s*:\s*([0-9][0-9.]*)", output)
    return match.group(1) if match else None


def parse_rocm_smi(output: str) -> list[Gpu]:
    """``rocm-smi --showproductname --showmeminfo vram --showdriverversion --json``.

    One ``cardN`` object per GPU (``Card series``, ``GFX Version``, ``VRAM Total Memory
    (B)`` as a string of bytes) and a ``system`` object with the driver version.
    """
    try:
        document = json.loads(output)
    except ValueError:
        return []
    if not isinstance(document, dict):
        return []
    system = document.get("system")
    driver = system.get("Driver version") if isinstance(system, dict) else None
    found = []
    for key, card in document.items():
        if not (isinstance(card, dict) and re.fullmatch(r"card\d+", key)):
            continue
        name = next((str(card[k]) for k in ("Card series", "Card SKU", "Card model") if card.get(k)), "")
        vram = _int(str(card.get("VRAM Total Memory (B)", "")).strip() or None)
        architecture = card.get("GFX Version")
        found.append(
            Gpu(
                vendor="AMD",
                model=name or "AMD GPU",
                count=1,
                vram=vram // 1024**2 if vram else None,
                architecture=str(architecture) if architecture else None,
                framework="ROCm",
                driver_version=str(driver) if driver else None,
            )
        )
    return group_gpus(found)


def group_gpus(gpus: Iterable[Gpu]) -> list[Gpu]:
    """Identical GPUs as one entry with their total count, in order of appearance."""
    counts: dict[Gpu, int] = {}
    for gpu in gpus:
        key = replace(gpu, count=1)
        counts[key] = counts.get(key, 0) + gpu.count
    return [replace(key, count=count) for key, count in counts.items()]


async def find_gpus(
    spawner: IReactorProcess,
    env: Mapping[str, str],
    *,
    clock: IReactorTime | None = None,
    timeout: float = GPU_TOOL_TIMEOUT,
) -> list[Gpu]:
    """The node's GPUs according to ``nvidia-smi`` and ``rocm-smi``; ``[]`` whatever goes wrong.

    A tool is run only when it is on ``env``'s ``PATH`` (the one payloads get), with
    ``env`` as its environment.  A tool that fails, prints nothing usable or takes
    longer than ``timeout`` seconds (``clock`` defaults to ``spawner`` when it is a
    reactor) adds no GPU: a node whose GPU driver is broken is reported without GPUs.
    """
    timer = clock if clock is not None else IReactorTime(spawner, None)
    search = env.get("PATH", os.defpath)
    gpus: list[Gpu] = []
    nvidia = shutil.which("nvidia-smi", path=search)
    if nvidia is not None:
        output = await _tool_output(spawner, timer, timeout, nvidia, NVIDIA_QUERY, env)
        if output:
            header = await _tool_output(spawner, timer, timeout, nvidia, (), env)
            gpus += parse_nvidia_smi(output, parse_cuda_version(header or ""))
    rocm = shutil.which("rocm-smi", path=search)
    if rocm is not None:
        output = await _tool_output(spawner, timer, timeout, rocm, ROCM_QUERY, env)
        if output:
            gpus += parse_rocm_smi(output)
    return gpus


async def _tool_output(
    spawner: IReactorProcess,
    clock: IReactorTime | None,
    timeout: float,
    executable: str,
    args: Sequence[str],
    env: Mapping[str, str],
) -> str | None:
    """A helper's standard output if it exits 0 in time, else None (logged at debug level).

    ``getProcessOutputAndValue`` cannot kill its child: a helper that overruns is only
    given up on, and Twisted reaps it whenever it ends.
    """
    try:
        running: Deferred[tuple[bytes, bytes, int]] = getProcessOutputAndValue(  # type: ignore[no-untyped-call]
            executable, args, env=dict(env), reactor=spawner
        )
        running.addErrback(_signalled)
        if clock is not None:
            running.addTimeout(timeout, clock)
        out, err, code = await running
    except CancelledError:
        raise  # our caller gave up
    except Exception as exc:  # noqa: BLE001 - a time-out, a signal, a failed spawn: all mean no GPU found
        log.debug("{tool} failed: {error!r}", tool=executable, error=exc, event="workernode.gpu_tool")
        return None
    if code != 0:
        log.debug(
            "{tool} exited with {code}: {stderr}",
            tool=executable,
            code=code,
            stderr=(err or out).decode("utf-8", "replace").strip()[:200],
            event="workernode.gpu_tool",
        )
        return None
    return out.decode("utf-8", "replace")


def _signalled(failure: Failure) -> Failure:
    """``getProcessOutputAndValue`` fails with a bare ``(out, err, signal)`` tuple for a killed helper."""
    if isinstance(failure.value, tuple):
        return Failure(ChildProcessError(f"killed by signal {failure.value[-1]}"))
    return failure


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
