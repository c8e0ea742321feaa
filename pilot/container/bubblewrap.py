"""Bubblewrap (``bwrap``): the host's own system, read-only, around one writable work directory.

Bubblewrap needs no image and no daemon: it builds a fresh mount namespace from
pieces of the host.  The payload sees

* the system trees (``/usr``, ``/bin``, ``/lib*``, ``/etc``, ``/opt``, ``/cvmfs``: those
  that exist) read-only, merged-``/usr`` symlinks recreated as symlinks;
* a new ``/proc`` (its own pid namespace), a minimal ``/dev`` and a private, empty
  ``/tmp``, so nothing the pilot or other jobs keep in the host's ``/tmp`` (proxies!)
  is reachable;
* its work directory read-write at the same path (argument vectors and file names
  from the job definition stay valid), as working directory and ``HOME``;
* the spec's extra binds; nothing else: the root is an empty tmpfs remounted
  read-only at the end, so writes anywhere but the work directory, ``/tmp`` and
  ``/dev/shm`` fail.  When the work directory lies below ``/tmp`` on the host, the
  directories leading to it inside the private ``/tmp`` get a read-only cover too.

Hidden paths (the pilot directory, proxy, token files) that lie inside a bound tree
are covered: a directory by an empty tmpfs (remounted read-only), a file by
``/dev/null``.  bwrap applies mounts in command-line order and a later mount covers
whatever an earlier one put at or below its destination, so the mounts are sorted by
the depth of their destination, parents first: a hidden pilot directory is covered
before the job's work directory inside it is bound back.

Process handling: ``--unshare-pid``/``--unshare-ipc`` (and ``--unshare-net`` when
the spec says so); ``--die-with-parent`` so that killing bwrap (the process runner
kills its whole process group) SIGKILLs everything in the sandbox; ``--new-session``
so a payload can never push input into a terminal the pilot might run on;
``--cap-drop ALL`` because as root bwrap otherwise *keeps* every capability, and a
payload with ``CAP_SYS_ADMIN`` could simply unmount the masks.  bwrap does not
forward signals: SIGTERM ends bwrap at once and the sandbox is SIGKILLed with it, so
a payload gets no grace period to clean up (the runner's SIGTERM does reach it, but
only an instant before the SIGKILL).

The environment reaches the payload through bwrap's own environment (``Launch.env``),
never through ``--setenv``, so no value ever appears on a command line.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from zope.interface import implementer

from pilot.container.interfaces import IContainerRuntime
from pilot.container.spec import SYSTEM_TREES, ContainerSpec, ImageError, Launch
from pilot.util.records import record

#: Files that are often symlinks out of /etc into trees we do not bind (systemd-resolved
#: keeps resolv.conf in /run): their targets are bound read-only so name lookups work.
_ETC_LINKS = ("/etc/resolv.conf",)


def _within(path: str, tree: str) -> bool:
    """Whether ``path`` is ``tree`` or lies below it (both absolute and normalised)."""
    return tree == "/" or path == tree or path.startswith(tree + "/")


def _below(path: str, tree: str) -> str | None:
    """The first directory under ``tree`` on the way to ``path`` (None if ``path`` is not below it)."""
    if not path.startswith(tree + "/"):
        return None
    return tree + "/" + path[len(tree) + 1 :].split("/")[0]


def _depth(path: str) -> int:
    return len(PurePosixPath(path).parts)


@record(frozen=True)
class _Mount:
    """One bwrap mount option and where it lands in the sandbox."""

    destination: str
    args: tuple[str, ...]


@implementer(IContainerRuntime)
class BubblewrapRuntime:
    """Runs a process under ``bwrap``; see the module docstring for what it sees."""

    name = "bubblewrap"

    def __init__(self, system_trees: Sequence[str] = SYSTEM_TREES) -> None:
        self.system_trees = tuple(os.path.normpath(tree) for tree in system_trees)

    def executable(self, environ: Mapping[str, str]) -> str | None:
        """The absolute path of ``bwrap`` on ``environ``'s PATH, or None."""
        return shutil.which("bwrap", path=environ.get("PATH", os.defpath))

    def available(self, environ: Mapping[str, str]) -> bool:
        """``bwrap`` is on PATH and can create its namespaces.

        An unprivileged, non-setuid bwrap needs user namespaces; when the kernel
        allows none (``user.max_user_namespaces = 0``) it would fail at every start,
        so it is reported as unavailable rather than failing each job.
        """
        path = self.executable(environ)
        if path is None:
            return False
        if os.geteuid() == 0 or os.stat(path).st_mode & stat.S_ISUID:
            return True
        try:
            with open("/proc/sys/user/max_user_namespaces", encoding="ascii") as limit:
                return int(limit.read().strip() or "1") > 0
        except (OSError, ValueError):
            return True  # no such knob: user namespaces are not limited

    def wrap(self, spec: ContainerSpec, environ: Mapping[str, str]) -> Launch:
        """``bwrap <options> -- <spec.argv>``, environment ``spec.env`` with ``HOME`` = workdir.

        Raises ``FileNotFoundError`` when bwrap is not installed and ``ValueError``
        for a spec bubblewrap cannot honour (an image, a hidden work directory,
        a relative bind destination, an empty argv).
        """
        bwrap = self.executable(environ)
        if bwrap is None:
            raise FileNotFoundError("bwrap is not on PATH (install bubblewrap)")
        if not spec.argv:
            raise ValueError("nothing to run: empty argv")
        if spec.image:
            raise ImageError(
                f"bubblewrap runs the host's own system and cannot run image {spec.image!r}; "
                "map this role to apptainer in the queue's container_type"
            )
        workdir = os.path.realpath(spec.workdir)

        mounts: list[_Mount] = []
        visible: list[tuple[str, str]] = []  # (host source, sandbox destination) of every bind
        trees = [tree for tree in self.system_trees if os.path.isdir(tree)]
        for tree in trees:
            real = os.path.realpath(tree)
            if os.path.islink(tree) and any(_within(real, other) for other in trees if other != tree):
                mounts.append(_Mount(tree, ("--symlink", os.readlink(tree), tree)))
            else:
                mounts.append(_Mount(tree, ("--ro-bind", tree, tree)))
                visible.append((real, tree))
        mounts += [
            _Mount("/proc", ("--proc", "/proc")),
            _Mount("/dev", ("--dev", "/dev")),
            _Mount("/tmp", ("--tmpfs", "/tmp")),
        ]
        for link in _ETC_LINKS:
            target = os.path.realpath(link)
            if (
                spec.network
                and os.path.islink(link)
                and any(_within(link, tree) for _, tree in visible)
                and os.path.isfile(target)
                and not any(_within(target, source) for source, _ in visible)
            ):
                mounts.append(_Mount(target, ("--ro-bind", target, target)))
                visible.append((target, target))
        mounts.append(_Mount(workdir, ("--bind", workdir, workdir)))
        visible.append((workdir, workdir))
        for bind in spec.binds:
            destination = os.path.normpath(bind.destination)
            if not os.path.isabs(destination):
                raise ValueError(f"bind destination {bind.destination} is not an absolute path")
            source = os.path.realpath(bind.source)
            mounts.append(
                _Mount(destination, ("--ro-bind" if bind.read_only else "--bind", source, destination))
            )
            visible.append((source, destination))

        masks, remounts = self._masks(spec.hidden, workdir, visible)
        # A bind below /tmp makes bwrap create the directories leading to it in the
        # private tmpfs, where the payload could then write next to them; a read-only
        # tmpfs over the first of them keeps "nothing but the binds" true there too.
        destinations = {destination for _, destination in visible}
        tops = {top for destination in destinations if (top := _below(destination, "/tmp")) is not None}
        for top in sorted(tops - destinations):
            if top not in remounts:
                masks.append(_Mount(top, ("--tmpfs", top)))
                remounts.append(top)
        ordered = sorted(mounts + masks, key=lambda mount: _depth(mount.destination))

        argv = [bwrap, "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc"]
        if not spec.network:
            argv.append("--unshare-net")
        argv += ["--cap-drop", "ALL"]
        for mount in ordered:
            argv += mount.args
        argv += ["--remount-ro", "/"]
        for destination in remounts:
            argv += ["--remount-ro", destination]
        argv += ["--chdir", workdir, "--", *spec.argv]
        # bwrap → bwrap (pid 1 of the new pid namespace) → the process: a SIGTERM to either
        # bwrap ends the sandbox with SIGKILL, so the soft stop skips those two levels.
        return Launch(argv=argv, env={**spec.env, "HOME": workdir}, shield_levels=2)

    @staticmethod
    def _masks(
        hidden: Sequence[Path], workdir: str, visible: Sequence[tuple[str, str]]
    ) -> tuple[list[_Mount], list[str]]:
        """Covers for every place where a hidden path would show through a bind.

        A hidden path outside every bound tree needs nothing (the sandbox root is
        empty), nor does one already under a cover with no bind in between: the
        pilot directory's tmpfs hides the token inside it, but a proxy copied into
        the work directory (bound back inside that tmpfs) needs its own.  A hidden
        *ancestor* of a bind (the pilot directory around the work directory) is
        covered, and the bind, being deeper, is mounted after it.
        """
        candidates: dict[str, tuple[str, bool]] = {}  # sandbox path -> (host path, is a directory)
        for path in hidden:
            host = os.path.realpath(path)
            if host == workdir:
                raise ValueError(f"the work directory {workdir} itself is listed as hidden")
            if not os.path.lexists(host):
                continue
            for source, destination in visible:
                if _within(host, source):
                    inside = os.path.normpath(os.path.join(destination, os.path.relpath(host, source)))
                    candidates.setdefault(inside, (host, os.path.isdir(host)))

        # What each sandbox path shows: the deepest bind or cover above it.
        layers: list[tuple[str, str | None]] = [(destination, source) for source, destination in visible]
        layers += [(inside, None) for inside, (_, is_dir) in candidates.items() if is_dir]
        layers += [("/", None), ("/tmp", None), ("/dev", None), ("/proc", None)]
        masks: list[_Mount] = []
        remounts: list[str] = []
        for inside, (host, is_dir) in sorted(candidates.items()):
            above = [
                (_depth(dest), order, src)
                for order, (dest, src) in enumerate(layers)
                if _within(inside, dest) and (dest, src) != (inside, None)
            ]
            _, _, shown_from = max(above, key=lambda layer: layer[:2])  # deepest; a cover beats a bind
            if shown_from is None or not _within(host, shown_from):
                continue  # already covered, or another bind shows something else there
            if is_dir:
                masks.append(_Mount(inside, ("--tmpfs", inside)))
                remounts.append(inside)
            else:
                masks.append(_Mount(inside, ("--ro-bind", "/dev/null", inside)))
        return masks, remounts
