"""Running the dev server and the pilot as real ``twistd`` processes on this machine.

Shared by the demo (``python -m pilot.demo``), the benchmarks and the end-to-end
tests, so that all of them exercise exactly what a site runs: ``twistd -n pilot``
talking HTTPS to a server in another process.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.internet.task import deferLater

from pilot.model.processes import ProcessOutcome
from pilot.process.runner import ManagedProcess
from pilot.util.records import record


class LaunchError(Exception):
    """A process needed for a local run did not start properly."""


_TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def twistd_argv(command: str, *args: str) -> list[str]:
    """``twistd --pidfile= -n <command> <args>`` run by the current interpreter."""
    return [sys.executable, "-c", _TWISTD, "--pidfile=", "-n", command, *args]


def _checkout_root() -> Path | None:
    """The source checkout this package runs from, if it is one (not an installed copy).

    twistd finds its plug-ins among the ``twisted/plugins`` directories on
    ``sys.path``; an editable install does not put the checkout there, so child
    processes get it on ``PYTHONPATH``.
    """
    root = Path(__file__).resolve().parent.parent
    if (root / "twisted" / "plugins" / "pilot_plugin.py").is_file() and not (
        root / "twisted" / "__init__.py"
    ).exists():
        return root
    return None


def child_environment(extra: Mapping[str, str] = {}) -> dict[str, str]:
    """A clean environment for the child processes: ours minus grid credentials, plus ``extra``."""
    drop = ("X509_USER_PROXY", "PANDA_AUTH_TOKEN", "OIDC_AUTH_TOKEN", "X509_CERT_DIR")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    root = _checkout_root()
    if root is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


@record
class LocalDevServer:
    """A ``twistd panda-dev`` process and what its ready file says."""

    process: ManagedProcess
    info: dict[str, Any]

    @property
    def url(self) -> str:
        return str(self.info["url"])

    async def stop(self) -> ProcessOutcome:
        return await self.process.terminate("local run finished")


async def start_dev_server_process(
    spawner: IReactorProcess,
    clock: IReactorTime,
    state_dir: Path,
    *,
    queue: str,
    job_files: Sequence[Path] = (),
    timefloor_minutes: int = 0,
    extra_args: Sequence[str] = (),
    timeout: float = 60.0,
) -> LocalDevServer:
    """Start ``twistd -n panda-dev`` on a free loopback port; returns once it listens."""
    state_dir.mkdir(parents=True, exist_ok=True)
    ready = state_dir / "ready.json"
    ready.unlink(missing_ok=True)
    args = ["--port", "0", "--state-dir", str(state_dir), "--queue", queue, "--ready-file", str(ready)]
    args += ["--timefloor", str(timefloor_minutes)]
    for path in job_files:
        args += ["--jobs", str(path)]
    process = ManagedProcess(
        spawner,
        clock,
        twistd_argv("panda-dev", *args, *extra_args),
        env=child_environment(),
        cwd=state_dir,
        stdout=state_dir / "panda-dev.log",
        stderr=state_dir / "panda-dev.log",
        kill_grace=5.0,
        name="panda-dev",
    )
    process.start()
    waited = 0.0
    while not ready.exists():
        if not process.running:
            log = (state_dir / "panda-dev.log").read_text(errors="replace")[-2000:]
            raise LaunchError(f"panda-dev exited before it was ready:\n{log}")
        if waited > timeout:
            await process.terminate("not ready in time")
            raise LaunchError(f"panda-dev not ready after {timeout:.0f} s")
        await deferLater(clock, 0.05, lambda: None)
        waited += 0.05
    return LocalDevServer(process, json.loads(ready.read_text()))


def pilot_arguments(
    url: str,
    ca_cert: str,
    *,
    queue: str,
    workdir: Path,
    summary_file: Path,
    extra: Sequence[str] = (),
) -> list[str]:
    """The ``twistd pilot`` arguments for a run against the server at ``url``."""
    return [
        "-q",
        queue,
        "--url",
        url,
        "--cacert",
        ca_cert,
        "--queuedata",
        f"{url}/cache/schedconfig/{queue}.all.json",
        "--job-label",
        "managed",
        "--workdir",
        str(workdir),
        "--summary-file",
        str(summary_file),
        "--log-file",
        str(workdir / "pilotlog.json"),
        *extra,
    ]


async def run_pilot(
    spawner: IReactorProcess,
    clock: IReactorTime,
    server: LocalDevServer,
    run_dir: Path,
    *,
    queue: str,
    extra: Sequence[str] = (),
) -> tuple[ProcessOutcome, dict[str, Any]]:
    """Run ``twistd -n pilot`` against ``server`` until it exits; returns its outcome and summary.

    The pilot works in ``run_dir/pilot``, logs to ``run_dir/pilot.log`` and writes its
    summary to ``run_dir/summary.json`` (an empty summary if it wrote none).
    """
    summary_file = run_dir / "summary.json"
    args = pilot_arguments(
        server.url,
        str(server.info["ca_cert"]),
        queue=queue,
        workdir=run_dir / "pilot",
        summary_file=summary_file,
        extra=extra,
    )
    process = start_pilot_process(
        spawner,
        clock,
        args,
        proxy=str(server.info["client_proxy"]),
        workdir=run_dir / "pilot",
        log_path=run_dir / "pilot.log",
    )
    outcome = await process.wait()
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {"pilot": {}, "jobs": []}
    return outcome, summary


def start_pilot_process(
    spawner: IReactorProcess,
    clock: IReactorTime,
    args: Sequence[str],
    *,
    proxy: str,
    workdir: Path,
    log_path: Path,
    extra_env: Mapping[str, str] | None = None,
) -> ManagedProcess:
    """Start ``twistd -n pilot <args>`` with ``X509_USER_PROXY=proxy`` (and ``extra_env``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    process = ManagedProcess(
        spawner,
        clock,
        twistd_argv("pilot", *args),
        env=child_environment({"X509_USER_PROXY": proxy, **(extra_env or {})}),
        cwd=workdir,
        stdout=log_path,
        stderr=log_path,
        kill_grace=30.0,
        name="pilot",
    )
    process.start()
    return process
