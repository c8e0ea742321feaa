"""What one Ray actor does with a batch of event ranges: process them, return the outputs.

The actor lives on some node of the allocation; the driver (``pilot.hpc.raydriver``) holds
the channel connection and the output directory.  No file system is assumed to be shared
between the nodes, so an actor never writes where the pilot can see: it hands each
range's output back as bytes, through Ray, and the driver writes it.

Two processors:

* built in (no ``command``): the events of the range are "processed" exactly as the
  reference payload (``tests/es_payload.py``) does it, and the output is byte for byte
  the reference payload's, so every check the pilot's tests make of an output holds for
  this driver too;
* a shell command template: run once per range on the actor's node with the range's
  fields substituted (shell-quoted), writing a node-local temporary file whose bytes are
  the output; a non-zero exit fails the range.

Everything that crosses Ray is plain tuples of built-in types: cheap to serialise, and
nothing on the other side has to import this module by name (the driver ships this
module to the workers by value, so a node needs Ray but not txpilot).

This module imports only the standard library; ``ray.remote`` is applied by the driver.
"""

from __future__ import annotations

import hashlib
import os
import re
import resource
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence

#: One range as it travels to an actor: (range id, start event, last event, LFN, GUID, scope).
RangeSpec = tuple[str, int, int, str, str, str]
#: One range's outcome: (range id, output bytes or None, error text ("" when it worked),
#: CPU seconds, wall seconds).
Outcome = tuple[str, bytes | None, str, float, float]

#: What a ``--command`` template may name; anything else in braces is left alone (shell
#: code such as ``${HOME}`` keeps working).
PLACEHOLDERS = ("id", "start", "last", "lfn", "guid", "scope", "output")
_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")

#: The tail of a failed command's standard error quoted in its range's error text.
ERROR_TAIL = 300


def events_digest(spec: RangeSpec, event_seconds: float = 0.0) -> str:
    """ "Process" the range's events: a hash over them (and a sleep each), the same for the same range.

    The same digest as the reference payload's, so outputs can be compared with its own.
    """
    _, start, last, lfn, guid, _ = spec
    digest = hashlib.sha256(f"{lfn}\0{guid}\0".encode())
    for event in range(start, last + 1):
        digest.update(event.to_bytes(8, "little", signed=True))
        if event_seconds > 0:
            time.sleep(event_seconds)
    return digest.hexdigest()


def output_content(spec: RangeSpec, size: int, digest: str | None = None) -> bytes:
    """The built-in processor's output: a header naming the range, then filler, ``size`` bytes.

    A function of the range alone (the reference payload's format), so whoever checks an
    output can recompute it without knowing which node or actor made it.
    """
    range_id, start, last, lfn, guid, scope = spec
    if digest is None:
        digest = events_digest(spec)
    header = (
        f"txpilot-es-payload range={range_id} events={start}..{last}"
        f" lfn={lfn} guid={guid} scope={scope} digest={digest}\n"
    ).encode()
    seed = hashlib.sha256(header).digest()
    parts = [header]
    length = len(header)
    block = 0
    while length < size:
        chunk = hashlib.sha256(seed + block.to_bytes(8, "little")).digest()
        parts.append(chunk)
        length += len(chunk)
        block += 1
    return b"".join(parts)[:size]


def command_line(template: str, spec: RangeSpec, output: str) -> str:
    """``template`` with the range's fields in place of ``{id}``, ``{start}``...: each shell-quoted.

    The fields come from the server (an LFN is any text): quoting each one keeps them
    words, never shell code.
    """
    range_id, start, last, lfn, guid, scope = spec
    values = {
        "id": range_id,
        "start": str(start),
        "last": str(last),
        "lfn": lfn,
        "guid": guid,
        "scope": scope,
        "output": output,
    }
    return _PLACEHOLDER.sub(lambda match: shlex.quote(values[match.group(1)]), template)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class RangeProcessor:
    """The body of one actor: ``describe()`` once, then ``process(batch)`` per batch.

    A plain class so that this module imports without Ray; the driver wraps it with
    ``ray.remote``.  One range's failure is that range's outcome, never an exception out of
    ``process``: an exception would lose the whole batch, and the driver could only tell
    the pilot that every range in it failed.
    """

    def __init__(self, output_bytes: int, event_seconds: float, command: str | None) -> None:
        self.output_bytes = output_bytes
        self.event_seconds = event_seconds
        self.command = command
        self.ranges = 0
        # node-local scratch for a command's outputs: nothing is left there between ranges
        self._scratch = tempfile.mkdtemp(prefix="txpilot-ray-") if command else None

    def describe(self) -> tuple[int, str, str]:
        """(pid, host name, Ray node id): the driver writes them down (``--pids-file``) and logs them."""
        import ray  # the actor runs inside Ray: it is there

        return os.getpid(), socket.gethostname(), ray.get_runtime_context().get_node_id()

    def process(self, specs: Sequence[RangeSpec]) -> list[Outcome]:
        """Each range's outcome, in the order given."""
        outcomes: list[Outcome] = []
        for spec in specs:
            self.ranges += 1
            wall = time.monotonic()
            try:
                if self.command is None:
                    cpu = time.process_time()
                    data = output_content(spec, self.output_bytes, events_digest(spec, self.event_seconds))
                    outcome: Outcome = (spec[0], data, "", time.process_time() - cpu, 0.0)
                else:
                    outcome = self._run_command(spec)
            except Exception as exc:  # noqa: BLE001 - one range's failure is reported, the batch goes on
                outcome = (spec[0], None, f"{type(exc).__name__}: {exc}", 0.0, 0.0)
            range_id, output, error, cpu_s, _ = outcome
            outcomes.append((range_id, output, error, max(cpu_s, 0.0), time.monotonic() - wall))
        return outcomes

    def _run_command(self, spec: RangeSpec) -> Outcome:
        assert self.command is not None and self._scratch is not None
        output = os.path.join(self._scratch, f"range-{self.ranges}.out")
        errors = os.path.join(self._scratch, f"range-{self.ranges}.err")
        cpu = _children_cpu()
        try:
            with open(errors, "wb") as stderr:
                ended = subprocess.run(
                    ["/bin/sh", "-c", command_line(self.command, spec, output)],
                    cwd=self._scratch,
                    stdin=subprocess.DEVNULL,
                    stderr=stderr,
                    check=False,
                )
            cpu_s = _children_cpu() - cpu
            if ended.returncode != 0:
                how = (
                    f"killed by signal {-ended.returncode}"
                    if ended.returncode < 0
                    else f"exited with status {ended.returncode}"
                )
                return spec[0], None, f"the command {how}{self._tail(errors)}", cpu_s, 0.0
            try:
                with open(output, "rb") as produced:
                    data = produced.read()
            except FileNotFoundError:
                return spec[0], None, f"the command wrote no output file{self._tail(errors)}", cpu_s, 0.0
            return spec[0], data, "", cpu_s, 0.0
        finally:
            for leftover in (output, errors):
                try:
                    os.unlink(leftover)
                except FileNotFoundError:
                    pass

    @staticmethod
    def _tail(path: str) -> str:
        """``: <the last bytes of standard error>``, on one line, or nothing."""
        try:
            with open(path, "rb") as stream:
                stream.seek(max(0, os.fstat(stream.fileno()).st_size - ERROR_TAIL))
                text = stream.read().decode("utf-8", "replace")
        except OSError:
            return ""
        text = " ".join(text.split())
        return f": {text}" if text else ""

    def close(self) -> None:
        """Remove the node-local scratch directory (the driver calls this at the end)."""
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
