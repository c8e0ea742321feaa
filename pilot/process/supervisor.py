"""A payload whose end is known even if the pilot was dead when it came: the supervisor.

``supervised_argv(status_file, argv)`` is an argument-vector prefix: a few lines of
POSIX ``sh`` (``SCRIPT``) that run ``argv`` as their only child, wait for it, record
how it ended in ``status_file``, durably, and then end the way the child ended.  The
pilot starts that vector as it starts any process (``ManagedProcess``: ``setsid``, a
process group of its own, output to files), so the supervisor is the group leader
and the payload its child in the same group and session.  If the pilot is killed
meanwhile, the supervisor is reparented and goes on; a successor pilot reads the
status file (``read_status``) or adopts the still-running supervisor
(``pilot.process.adopt``).

The script gets everything as positional parameters (``$1`` the status file, ``$2``-``$5``
the absolute paths of ``dd``, ``mv``, ``date`` and ``sync`` as the pilot found them,
``$6``-``$8`` the payload's own ``PWD``, ``OLDPWD`` and ``SHLVL``, then argv); nothing is
interpolated into shell code.  Step by step:

* ``set +e …`` and stderr to ``/dev/null`` (the original kept on fd 9 for the child): an
  imported ``SHELLOPTS`` cannot make it stop early, and bash's "Killed" or "Segmentation
  fault" notices do not land in the payload's stderr.
* ``trap : HUP INT QUIT ALRM TERM USR1 USR2 XCPU XFSZ VTALRM PROF PIPE``: a signal sent
  to the whole group (the pilot's SIGTERM, a batch system's SIGXCPU/SIGUSR1 warning)
  reaches the payload, while the supervisor only notes it and waits on.  A handler,
  not ``trap ''``: an ignored signal would be inherited as ignored by the payload,
  whereas a caught one is reset to its default by the ``exec``.
* The payload runs in the foreground, ``( exec "$@" )``: a subshell (for ``shift`` and
  the environment fix-up) that ``exec``s the payload, so it is always an external
  program, never a shell builtin or function.  Not ``"$@" &``: an asynchronous command
  of a non-interactive shell gets SIGINT and SIGQUIT ignored and stdin from
  ``/dev/null``.  ``PWD``, ``OLDPWD`` and ``SHLVL``, which the shell rewrites when it
  starts (dash adds ``PWD``; bash also bumps ``SHLVL`` and drops an ``OLDPWD`` that is not
  a directory), are put back as the pilot gave them.
* After the child: the same signals are ignored while the status is written (the
  helpers inherit that), the JSON line ``{"exit_status", "ended", "pid", "start_ticks",
  "boot_id"}`` (the last three are the supervisor's own identity, from ``/proc``) goes
  to ``<status_file>.tmp`` through ``dd conv=fsync``, is renamed into place with ``mv``,
  and the directory is synced with ``sync DIR`` where ``sync`` takes file operands
  (coreutils >= 8.24; 8.22 on EL7 and busybox ignore them and sync every file system,
  so there it is skipped).  ``read_status`` falls back to the ``.tmp`` name, which was
  fsync'ed, if a crash lost the rename.
* A status of 128+N, N a signal whose default action ends a process, is raised again
  (``trap - N; ulimit -c 0; kill -N $$``, no second core dump), so whoever waits for the
  supervisor sees the signal, as without it; anything else is its exit code.

The shell reports a child killed by signal N as status 128+N, as it does a child that
exited with code 128+N: the supervisor, and ``PayloadStatus``, read both as the signal.

Measured on Debian 12 (dash 0.5.12 as ``/bin/sh``; bash 5.2 invoked as ``sh``, as on EL),
ext4 on a virtual disk, medians of 200 runs: the payload starts ~0.9 ms (dash) / ~1.3 ms
(bash) later than without the supervisor, and recording the status takes ~5 ms after it
ends (``date``, ``dd`` with its fsync, ``mv``, ``sync DIR``).  While the payload runs the
supervisor holds 1.6 MB (dash) / 3.0 MB (bash) resident, nearly all of it shared
libraries: 0.2 / 0.4 MB proportional (PSS), 0.1 / 0.3 MB private.  A monitor summing the
RSS of the payload's process tree counts the 1.6 / 3.0 MB.

How the pilot uses this
-----------------------
The payload phase builds ``supervised_argv(workdir / PAYLOAD_STATUS_FILE, launch.argv,
env=launch.env)`` (outside any container launcher, so the status file is written on
the host; a cgroup prefix composes in front of it) and journals the supervisor's pid
(= process group) and ``process_identity(pid)`` once started.  Three things change for
the job's processes: the payload's parent is the supervisor, not the pilot; the pid the
pilot sees (``ManagedProcess.pid``, ``{payload_pid}``) is the supervisor's, one level
above the payload (add one to a launcher's ``soft_stop_depth``: the supervisor is the
outermost launcher level); and a SIGKILL to the group (the end of the kill escalation)
kills the supervisor too, so nothing is recorded then, but the pilot is alive and
journals the outcome itself.  A successor calls ``read_status(status_file,
supervisor=identity)``.

Limits: the supervisor needs fds 0-2 open (``ManagedProcess`` always opens them) and
uses fd 9 for itself, so a payload cannot inherit an fd 9 through it; environment
names a POSIX shell owns (``IFS``, ``PPID``, ``OPTIND``; with bash also ``PS1``,
``PS4``, ``LINENO``, ``SHELLOPTS``, ``BASHOPTS``, ``POSIXLY_CORRECT``) and names that are
not shell identifiers (``BASH_FUNC_f%%``: dash drops them, bash rewrites them) do not
reach the payload unchanged: ``shell_altered_names(env)`` lists them (the pilot's
allow-listed payload environment has none).  If the status cannot be written (a full
disk), one line saying so goes to the payload's stderr and the supervisor still ends
as its child did.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pilot.model.processes import ProcessOutcome
from pilot.process.identity import ProcessIdentity
from pilot.util.records import record

SH = "/bin/sh"
DD = shutil.which("dd") or "/bin/dd"
MV = shutil.which("mv") or "/bin/mv"
DATE = shutil.which("date") or "/bin/date"
SYNC = shutil.which("sync") or "/bin/sync"

#: The supervisor's ``$0``: how its own messages and ``ps`` name it.
NAME = "txpilot-supervisor"

#: Appended to the status file's name for the copy written before the rename.
TMP_SUFFIX = ".tmp"

#: Signals that end a process by default: a status of 128 + one of them is read as
#: death by that signal (the script's ``case`` lists the same numbers).
TERMINATING_SIGNALS: frozenset[int] = frozenset([*range(1, 17), 24, 25, 26, 27, 29, 30, 31, *range(34, 65)])

_SIGNALS = "HUP INT QUIT ALRM TERM USR1 USR2 XCPU XFSZ VTALRM PROF PIPE"

#: The supervisor (see the module docstring).  $1 status file, $2 dd, $3 mv, $4 date,
#: $5 sync ("" to skip), $6 PWD, $7 OLDPWD, $8 SHLVL ("=value", "" unset, "-" leave), argv.
SCRIPT = f"""\
set +e +u +x +v +f +a
exec 9>&2 2>/dev/null
trap : {_SIGNALS}
(
  case $6 in -) ;; =*) PWD=${{6#=}}; export PWD ;; *) unset PWD ;; esac
  case $7 in -) ;; =*) OLDPWD=${{7#=}}; export OLDPWD ;; *) unset OLDPWD ;; esac
  case $8 in -) ;; =*) SHLVL=${{8#=}}; export SHLVL ;; *) unset SHLVL ;; esac
  shift 8
  exec "$@"
) 2>&9 9>&-
s=$?
trap '' {_SIGNALS}
f=$1 dd=$2 mv=$3 date=$4 sync=$5 ticks=null boot=null
if read -r st < "/proc/$$/stat"; then
  st=${{st##*') '}}
  IFS=' '
  set -f
  set -- $st
  case ${{20}} in ''|*[!0-9]*) ;; *) ticks=${{20}} ;; esac
fi
if read -r b < /proc/sys/kernel/random/boot_id; then
  case $b in ''|*[!0-9a-f-]*) ;; *) boot="\\"$b\\"" ;; esac
fi
e=$("$date" +%s)
case $e in ''|*[!0-9]*) e=null ;; esac
if printf '{{"exit_status": %d, "ended": %s, "pid": %d, "start_ticks": %s, "boot_id": %s}}\\n' \\
    "$s" "$e" "$$" "$ticks" "$boot" | "$dd" of="$f{TMP_SUFFIX}" conv=fsync && "$mv" -f "$f{TMP_SUFFIX}" "$f"
then
  [ -z "$sync" ] || "$sync" "${{f%/*}}/."
else
  printf '%s: could not record exit status %d in %s\\n' "$0" "$s" "$f" >&9
fi
n=$((s - 128))
case $n in
  1|2|3|4|5|6|7|8|9|1[0-6]|2[4-7]|29|3[01]|3[4-9]|[45][0-9]|6[0-4])
    case $n in 9) ;; *) trap - "$n" ;; esac
    ulimit -c 0
    kill -"$n" "$$" ;;
esac
exit "$s"
"""

#: Environment names a POSIX shell sets itself (dash, or bash as ``sh``).
SHELL_OWNED = frozenset(
    ["IFS", "PPID", "OPTIND", "PS1", "PS2", "PS4", "LINENO", "SHELLOPTS", "BASHOPTS", "POSIXLY_CORRECT"]
)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def sync_takes_files(path: str) -> bool:
    """Whether ``sync`` at ``path`` syncs just the files it is given (coreutils >= 8.24).

    Told by its own help text (``--file-system`` came with file operands), without
    starting it: an older coreutils or busybox ``sync`` ignores its operands and syncs
    every file system on the node, which may take long on a busy one.
    """
    try:
        with open(path, "rb") as binary:
            return b"--file-system" in binary.read(4 << 20)
    except OSError:
        return False


SYNC_TAKES_FILES = sync_takes_files(SYNC)


def _kept(env: Mapping[str, str] | None, name: str) -> str:
    if env is None:
        return "-"
    value = env.get(name)
    return "" if value is None else f"={value}"


def supervised_argv(
    status_file: Path,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    shell: str = SH,
) -> list[str]:
    """``argv`` run under the supervisor, which records its end in ``status_file``.

    ``env``: the environment the vector will be started with; given, the payload sees
    exactly its ``PWD``, ``OLDPWD`` and ``SHLVL`` (which the shell would otherwise
    rewrite).  ``status_file`` must be absolute (the supervisor runs in the payload's
    working directory).
    """
    if not argv:
        raise ValueError("empty argv")
    if argv[0].startswith("-"):
        raise ValueError(f"a command name may not start with '-': {argv[0]!r}")
    path = os.fspath(status_file)
    if not os.path.isabs(path):
        raise ValueError(f"the status file must be an absolute path: {path!r}")
    sync = SYNC if SYNC_TAKES_FILES else ""
    return [
        shell, "-c", SCRIPT, NAME, path, DD, MV, DATE, sync,
        _kept(env, "PWD"), _kept(env, "OLDPWD"), _kept(env, "SHLVL"),
        *argv,
    ]  # fmt: skip


def shell_altered_names(env: Mapping[str, str]) -> list[str]:
    """Names in ``env`` that would not reach a supervised payload unchanged (see the limits)."""
    return sorted(name for name in env if name in SHELL_OWNED or not _IDENTIFIER.match(name))


@record(frozen=True)
class PayloadStatus:
    """What the supervisor recorded: the payload's shell status and the supervisor's identity."""

    #: the shell's status of the payload: its exit code, or 128 + the signal that killed it
    exit_status: int
    #: when the payload ended, seconds since the epoch (whole seconds), if known
    ended: float | None = None
    #: the supervisor's pid (= the payload's process group), start ticks and boot id
    pid: int | None = None
    start_ticks: int | None = None
    boot_id: str | None = None

    @property
    def signal(self) -> int | None:
        """The signal that killed the payload (a status of 128 + a terminating signal)."""
        number = self.exit_status - 128
        return number if number in TERMINATING_SIGNALS else None

    @property
    def exit_code(self) -> int | None:
        return None if self.signal is not None else self.exit_status

    @property
    def supervisor(self) -> ProcessIdentity | None:
        """The identity of the supervisor that wrote this, if it could read its own ``/proc``."""
        if self.pid is None or self.start_ticks is None:
            return None
        return ProcessIdentity(self.pid, self.start_ticks, self.boot_id or "")

    def written_by(self, identity: ProcessIdentity) -> bool:
        """Whether the supervisor ``identity`` wrote this (True if the status names none)."""
        supervisor = self.supervisor
        return supervisor is None or supervisor == identity

    def outcome(
        self, *, started: float, pid: int | None = None, terminated_by_pilot: bool = False
    ) -> ProcessOutcome:
        """The payload's end as a ``ProcessOutcome`` (``started``: when it was started)."""
        return ProcessOutcome(
            pid=pid if pid is not None else (self.pid or 0),
            exit_code=self.exit_code,
            signal=self.signal,
            started=started,
            ended=self.ended if self.ended is not None else started,
            terminated_by_pilot=terminated_by_pilot,
        )


def _optional_count(document: Mapping[str, Any], name: str) -> int | None:
    value = document.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(name)
    return value


def parse_status(text: bytes) -> PayloadStatus | None:
    """A status file's content; None unless it is a complete, well-formed record."""
    try:
        document = json.loads(text)
    except ValueError:  # partial, empty, not UTF-8, not JSON
        return None
    if not isinstance(document, dict):
        return None
    status = document.get("exit_status")
    if not isinstance(status, int) or isinstance(status, bool) or not 0 <= status <= 255:
        return None
    ended = document.get("ended")
    if ended is not None and (isinstance(ended, bool) or not isinstance(ended, int | float)):
        return None
    boot = document.get("boot_id")
    if boot is not None and not isinstance(boot, str):
        return None
    try:
        pid = _optional_count(document, "pid")
        ticks = _optional_count(document, "start_ticks")
    except ValueError:
        return None
    return PayloadStatus(status, None if ended is None else float(ended), pid, ticks, boot)


def _read(path: Path) -> PayloadStatus | None:
    try:
        with open(path, "rb") as source:
            return parse_status(source.read(1 << 16))
    except OSError:
        return None


def read_status(status_file: Path, *, supervisor: ProcessIdentity | None = None) -> PayloadStatus | None:
    """What the supervisor recorded in ``status_file``; None if nothing usable is there.

    A missing, partial or garbage file is None, as is one written by another
    supervisor than ``supervisor`` (a status left by an earlier run in the same
    directory).  If the file is not there, the copy the supervisor fsync'ed before
    renaming it is read instead (a crash of the node may lose the rename).  Blocking
    (small file reads): call it in a worker thread.
    """
    for path in (status_file, status_file.with_name(status_file.name + TMP_SUFFIX)):
        status = _read(path)
        if status is not None and (supervisor is None or status.written_by(supervisor)):
            return status
    return None
