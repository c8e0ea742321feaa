"""Stand-in pilot for tests/test_hardening.py: hardens itself, then lets a "payload" look at it.

Run (as an unprivileged uid) with one mode: ``plain`` (nothing), ``undumpable``
(``make_undumpable``), ``scrub`` (``scrub_environment(os.environ)``), ``pop`` (only
``os.environ.pop``, to show that this alone does not help) or ``argv``
(``hide_argv_values`` of ``HIDE_ME``).  It then runs a payload, a grandchild with the
same uid, that reads ``/proc/<its parent>/environ`` and ``cmdline``, and prints one JSON
line: what the payload read (text or errno) and what the stand-in saw of itself.

Standard library and ``pilot.util`` only: the tests copy both next to this file, where
an unprivileged uid can read them.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

from pilot.util.hardening import hide_argv_values, is_dumpable, make_undumpable, scrub_environment

PAYLOAD = r"""
import json, os
result = {}
for name in ("environ", "cmdline"):
    try:
        with open(f"/proc/{os.getppid()}/{name}", "rb") as handle:
            result[name] = handle.read().decode("utf-8", "replace")
    except OSError as exc:
        result[name] = exc.errno
print(json.dumps(result))
"""


def main(mode: str) -> None:
    seen: dict[str, object] = {"uid": os.getuid()}
    if mode == "undumpable":
        seen["undumpable"] = make_undumpable()
    elif mode == "scrub":
        seen["removed"] = sorted(scrub_environment(os.environ))
    elif mode == "pop":
        os.environ.pop("AWS_SECRET_ACCESS_KEY")
    elif mode == "argv":
        seen["hidden"] = hide_argv_values([os.environ["HIDE_ME"]])
    seen["dumpable"] = is_dumpable()
    seen["argv"] = sys.argv[2:]
    getenv = ctypes.CDLL(None).getenv
    getenv.restype = ctypes.c_char_p
    getenv.argtypes = [ctypes.c_char_p]
    seen["libc_path"] = (getenv(b"PATH") or b"").decode()  # the C library's view after a rewrite
    payload = subprocess.run([sys.executable, "-c", PAYLOAD], capture_output=True, check=True, env={})
    seen["payload"] = json.loads(payload.stdout)
    sys.stdout.write(json.dumps(seen) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
