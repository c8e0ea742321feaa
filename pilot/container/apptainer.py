"""Apptainer (or SingularityCE/legacy ``singularity``): a process in the job's container image.

The launch is ``apptainer exec <options> <image> <argv...>``, built as an argument
vector (nothing goes through a shell):

``--cleanenv``
    The container starts from an empty environment; apptainer documents
    ``APPTAINERENV_<NAME>`` in *its* environment as the way to set ``NAME`` inside
    (``SINGULARITYENV_<NAME>`` for singularity).  So the payload's variables travel
    in the launcher's environment and never on a command line, where any user on
    the node could read a token with ``ps``.  ``HOME``, ``PATH`` and
    ``LD_LIBRARY_PATH`` are left out: they are host paths; apptainer refuses to set
    ``HOME`` that way and ``PATH`` would replace the image's own.
``--pwd <workdir>`` and ``-B <workdir>``
    The work directory appears at its host path, so argument vectors and file
    names from the job definition stay valid inside.
``-B /cvmfs``
    when the host has it; then one ``-B`` per extra bind (``src:dst[:ro]``).
The queue's ``container_options``
    split with ``shlex``; ``${workdir}`` (pilot3's variable) is replaced by the
    work directory, duplicates are dropped, and options this module owns
    (``--cleanenv``, ``--pwd``; the network ones when the network is off) are
    removed.  A queue without options gets pilot3's default, ``--contain --ipc``.
    When the spec hides paths and the options do not contain the container,
    ``--contain`` is added, so the host's ``$HOME``, ``/tmp`` and ``/var/tmp``
    (where proxies live) are not shared.  Apptainer cannot mask a path inside a
    bind, so a hidden path inside a bound directory is an error, not a leak.
``--net --network none``
    when the spec has no network (allowed for unprivileged users).

Flag names, forms and the environment rules were checked against apptainer's source
(``cmd/internal/cli/action_flags.go``, ``pkg/runtime/engine/apptainer/config/bind.go``,
``internal/pkg/util/env/create.go``); ``tests/data/apptainer-standin`` follows the same.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from collections.abc import Iterable, Mapping

from zope.interface import implementer

from pilot.container.interfaces import IContainerRuntime
from pilot.container.spec import Bind, ContainerSpec, ImageError, Launch
from pilot.util.records import record

#: ``exec`` flags that take a value (long name -> shorthand or "").
VALUE_FLAGS = {
    "add-caps": "",
    "app": "",
    "apply-cgroups": "",
    "authfile": "",
    "bind": "B",
    "blkio-weight": "",
    "blkio-weight-device": "",
    "cdi-dirs": "",
    "containlibs": "",
    "cpu-shares": "",
    "cpus": "",
    "cpuset-cpus": "",
    "cpuset-mems": "",
    "cwd": "",
    "device": "",
    "dns": "",
    "docker-host": "",
    "docker-password": "",
    "docker-username": "",
    "drop-caps": "",
    "env": "",
    "env-file": "",
    "fusemount": "",
    "home": "H",
    "hostname": "",
    "memory": "",
    "memory-reservation": "",
    "memory-swap": "",
    "mount": "",
    "netns-path": "",
    "network": "",
    "network-args": "",
    "no-env": "",
    "no-mount": "",
    "overlay": "o",
    "pem-path": "",
    "pids-limit": "",
    "pwd": "",
    "scratch": "S",
    "security": "",
    "tmpdir": "",
    "workdir": "W",
}
#: ``exec`` flags that are switches (long name -> shorthand or "").
BOOL_FLAGS = {
    "allow-setuid": "",
    "cleanenv": "e",
    "compat": "",
    "compat32": "",
    "contain": "c",
    "containall": "C",
    "disable-cache": "",
    "docker-login": "",
    "fakeroot": "f",
    "ignore-fakeroot-command": "",
    "ignore-subuid": "",
    "ignore-userns": "",
    "intel-hpu": "",
    "ipc": "i",
    "keep-privs": "",
    "net": "n",
    "no-eval": "",
    "no-home": "",
    "no-https": "",
    "no-init": "",
    "no-nv": "",
    "no-pid": "",
    "no-privs": "",
    "no-rocm": "",
    "no-umask": "",
    "nohttps": "",
    "nv": "",
    "nvccli": "",
    "oom-kill-disable": "",
    "passphrase": "",
    "pid": "p",
    "rocm": "",
    "sharens": "",
    "underlay": "",
    "unsquash": "",
    "userns": "u",
    "uts": "",
    "writable": "w",
    "writable-tmpfs": "",
}
_SHORT = {short: name for table in (VALUE_FLAGS, BOOL_FLAGS) for name, short in table.items() if short}

#: Options the runtime sets itself; a queue's copy is dropped.
_OWNED = frozenset({"cleanenv", "pwd", "cwd"})
#: Options that would give the container a network; dropped when the spec has none.
_NETWORK = frozenset({"net", "network", "network-args", "netns-path", "dns"})
#: pilot3's options for a queue that sets none (``-c -i``).
DEFAULT_OPTIONS = ("--contain", "--ipc")
#: Never passed as APPTAINERENV_*: host paths, and apptainer refuses or replaces them.
NOT_FORWARDED = frozenset({"HOME", "PATH", "LD_LIBRARY_PATH"})
#: The pilot's variables that configure the launcher itself (proxies also reach the
#: container: apptainer always passes them).
LAUNCHER_VARIABLES = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "TMPDIR",
        "XDG_RUNTIME_DIR",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "all_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "ALL_PROXY",
    }
)
#: Set by apptainer inside a container; a pilot running in one must not pass them on.
_INSIDE_MARKERS = frozenset({"CONTAINER", "NAME", "BIND", "ENVIRONMENT", "COMMAND", "APPNAME"})
_URI = re.compile(r"^[a-z][a-z0-9+.-]*:")
_WORKDIR_VARIABLE = re.compile(r"\$\{workdir\}|\$workdir(?![A-Za-z0-9_])")


@record(frozen=True)
class _Option:
    """One option of the queue's container_options: its canonical name and its words."""

    name: str | None  # long name, None for words this module does not know
    value: str | None
    words: tuple[str, ...]

    @property
    def key(self) -> tuple[str, str | None] | None:
        return (self.name, self.value) if self.name is not None else None


def _split_unescaped(text: str, separator: str) -> list[str]:
    """Split on ``separator`` unless backslash-escaped (apptainer's bind syntax)."""
    return re.split(rf"(?<!\\){re.escape(separator)}", text)


def parse_options(words: Iterable[str]) -> list[_Option]:
    """Group ``exec`` option words into options the way apptainer's flag parser does.

    Long flags as ``--name value`` or ``--name=value``; shorthands as ``-B value``,
    ``-Bvalue`` or ``-B=value``; clustered switches (``-ci``) are taken apart.  Words
    this module does not know are kept, in order, as they are (a newer apptainer
    may know them).
    """
    options: list[_Option] = []
    pending = list(words)
    index = 0
    while index < len(pending):
        word = pending[index]
        index += 1
        if word == "--":
            raise ValueError("container_options must not contain '--' (it would end apptainer's options)")
        if word.startswith("--"):
            name, equals, value = word[2:].partition("=")
            if name in VALUE_FLAGS:
                if not equals:
                    if index >= len(pending):
                        raise ValueError(f"container option {word} needs a value")
                    value = pending[index]
                    index += 1
                options.append(_Option(name, value, (f"--{name}", value)))
            elif name in BOOL_FLAGS:
                options.append(_Option(name, value.lower() if equals else "true", (word,)))
            else:
                options.append(_Option(None, None, (word,)))
            continue
        if word.startswith("-") and len(word) > 1:
            position = 1
            while position < len(word):
                name = _SHORT.get(word[position], "")
                rest = word[position + 1 :]
                if name in VALUE_FLAGS:
                    value = rest[1:] if rest.startswith("=") else rest
                    if not rest:
                        if index >= len(pending):
                            raise ValueError(f"container option -{word[position]} needs a value")
                        value = pending[index]
                        index += 1
                    options.append(_Option(name, value, (f"-{word[position]}", value)))
                    break
                if name in BOOL_FLAGS:
                    if rest.startswith("="):
                        options.append(_Option(name, rest[1:].lower(), (f"-{word[position]}{rest}",)))
                        break
                    options.append(_Option(name, "true", (f"-{word[position]}",)))
                    position += 1
                    continue
                options.append(_Option(None, None, ("-" + word[position:],)))
                break
            continue
        options.append(_Option(None, None, (word,)))
    return options


def split_binds(value: str) -> list[str]:
    """The bind specifications in one ``-B`` value, as apptainer's ParseBindPath reads it.

    Commas separate specifications, except that options after a third field stay
    with it (``/a:/b:ro,rw`` is one); ``\\,`` escapes a comma.
    """
    specs: list[str] = []
    for item in _split_unescaped(value, ","):
        item = item.strip()
        is_option = item in ("ro", "rw") or item.startswith(("image-src=", "id="))
        if is_option and specs and len(_split_unescaped(specs[-1], ":")) == 3:
            specs[-1] += "," + item
        elif item:
            specs.append(item)
    return specs


def _bind_spec(bind: Bind) -> str:
    source, destination = os.path.normpath(bind.source), os.path.normpath(bind.destination)
    for path in (source, destination):
        if not os.path.isabs(path):
            raise ValueError(f"bind path {path} is not absolute")
        if "," in path or ":" in path:
            raise ValueError(f"apptainer cannot bind {path!r}: ',' and ':' separate bind specifications")
    if bind.read_only:
        return f"{source}:{destination}:ro"  # "src:ro" would mean destination "ro"
    return source if source == destination else f"{source}:{destination}"


def _bind_paths(spec: str) -> tuple[str, str]:
    """(source, destination) of one ``src[:dst[:opts]]`` bind specification."""
    parts = [part.replace("\\:", ":").replace("\\,", ",") for part in _split_unescaped(spec, ":")]
    source = os.path.normpath(parts[0]) if parts[0] else parts[0]
    destination = os.path.normpath(parts[1]) if len(parts) > 1 and parts[1] else source
    return source, destination


def _within(path: str, tree: str) -> bool:
    return tree == "/" or path == tree or path.startswith(tree.rstrip("/") + "/")


@implementer(IContainerRuntime)
class ApptainerRuntime:
    """Runs a process with ``apptainer exec`` (``singularity exec`` where only that exists)."""

    name = "apptainer"

    def __init__(self, cvmfs: str = "/cvmfs") -> None:
        self.cvmfs = cvmfs

    def executable(self, environ: Mapping[str, str]) -> str | None:
        """``apptainer`` on ``environ``'s PATH, else ``singularity``, else None."""
        path = environ.get("PATH", os.defpath)
        return shutil.which("apptainer", path=path) or shutil.which("singularity", path=path)

    def available(self, environ: Mapping[str, str]) -> bool:
        """Either launcher is installed (whether it can start containers shows only when it runs)."""
        return self.executable(environ) is not None

    def wrap(self, spec: ContainerSpec, environ: Mapping[str, str]) -> Launch:
        """``apptainer exec ... <image> <argv>``; the payload's environment as ``APPTAINERENV_*``.

        Raises ``FileNotFoundError`` when neither apptainer nor singularity is
        installed, ``ValueError`` for a spec it cannot run safely (no image, an image
        path that does not exist, a hidden path inside a bind, unusable options).
        """
        executable = self.executable(environ)
        if executable is None:
            raise FileNotFoundError("neither apptainer nor singularity is on PATH")
        if not spec.image:
            raise ImageError(f"no container image for the {spec.role} (apptainer needs one)")
        image = spec.image
        if image.startswith("-"):
            raise ImageError(f"container image {image!r} would be read as an option")
        workdir = os.path.normpath(os.path.abspath(spec.workdir))
        if not _URI.match(image) and not os.path.exists(os.path.join(workdir, image)):
            raise ImageError(f"container image {image} does not exist")
        if not spec.argv:
            raise ValueError("nothing to run: empty argv")
        singularity = os.path.basename(executable) == "singularity"

        options = self._queue_options(spec.options, workdir, spec.network)
        argv = [executable, "exec", "--cleanenv", "--pwd", workdir]
        binds: list[str] = []
        for option in options:
            argv += option.words
            if option.name == "bind" and option.value is not None:
                binds += split_binds(option.value)
        contained = any(o.name in ("contain", "containall") and o.value != "false" for o in options)
        if spec.hidden and not contained:
            argv.append("--contain")
        bound = [_bind_paths(bind) for bind in binds]
        if (workdir, workdir) not in bound:
            argv += ["-B", workdir]
            bound.append((workdir, workdir))
        if os.path.isdir(self.cvmfs) and not any(dst == os.path.normpath(self.cvmfs) for _, dst in bound):
            argv += ["-B", self.cvmfs]
            bound.append((self.cvmfs, self.cvmfs))
        for bind in spec.binds:
            argv += ["-B", _bind_spec(bind)]
            bound.append((os.path.normpath(bind.source), os.path.normpath(bind.destination)))
        if not spec.network:
            argv += ["--net", "--network", "none"]
        self._check_hidden(spec, bound)
        argv += [image, *spec.argv]
        return Launch(argv=argv, env=self._environment(spec, environ, singularity))

    @staticmethod
    def _queue_options(text: str, workdir: str, network: bool) -> list[_Option]:
        """The queue's options: ``${workdir}`` expanded, owned ones removed, no duplicates."""
        if not text.strip() or text.strip().lower() == "none":
            return parse_options(DEFAULT_OPTIONS)
        try:
            words = shlex.split(text)
        except ValueError as exc:
            raise ValueError(f"cannot parse container_options {text!r}: {exc}") from None
        words = [_WORKDIR_VARIABLE.sub(lambda _: workdir, word) for word in words]
        kept: list[_Option] = []
        seen_options: set[tuple[str, str | None]] = set()
        seen_binds: set[str] = set()
        for option in parse_options(words):
            if option.name in _OWNED or (not network and option.name in _NETWORK):
                continue
            if option.name == "bind" and option.value is not None:
                fresh = [b for b in split_binds(option.value) if b not in seen_binds]
                seen_binds.update(fresh)
                if fresh:
                    kept.append(_Option("bind", ",".join(fresh), ("-B", ",".join(fresh))))
                continue
            key = option.key
            if key is not None:
                if key in seen_options:
                    continue
                seen_options.add(key)
            kept.append(option)
        return kept

    @staticmethod
    def _check_hidden(spec: ContainerSpec, bound: list[tuple[str, str]]) -> None:
        """Refuse to run when a hidden path would be visible through a bind."""
        for path in spec.hidden:
            host = os.path.realpath(path)
            for source, _ in bound:
                if os.path.isabs(source) and _within(host, os.path.realpath(source)):
                    raise ValueError(
                        f"{path} must stay hidden but lies in {source}, which is bound into the container"
                    )

    @staticmethod
    def _environment(spec: ContainerSpec, environ: Mapping[str, str], singularity: bool) -> dict[str, str]:
        """The launcher's environment: its own configuration plus the payload's variables."""
        env = {
            key: value
            for key, value in environ.items()
            if key in LAUNCHER_VARIABLES
            or (
                key.startswith(("APPTAINER_", "SINGULARITY_"))
                and key.partition("_")[2] not in _INSIDE_MARKERS
            )
        }
        prefixes = ("APPTAINERENV_", "SINGULARITYENV_") if singularity else ("APPTAINERENV_",)
        for key, value in spec.env.items():
            if key in NOT_FORWARDED:
                continue
            for prefix in prefixes:
                env[prefix + key] = value
        return env
