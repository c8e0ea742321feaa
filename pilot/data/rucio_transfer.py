"""Rucio transfers through the rucio-clients Python API, run as a child process.

This file is executed by the *rucio-clients* interpreter (not the pilot's), from a
directory holding no Python module that could shadow Rucio's imports: the
pilot stays free of Rucio's dependencies, a hung transfer can be killed with its
process group, and the trace fields PanDA uses (appid, eventType, pq, taskid,
localSite, remoteSite, usrdn) reach Rucio — the 41.x CLI no longer has trace
options.  Usage::

    python rucio_transfer.py download '<json request>'
    python rucio_transfer.py upload '<json request>'

The last line on stdout is a JSON object: ``{"ok": true, ...}`` or
``{"ok": false, "error": "...", "missing": bool}``.  Exit code 0 on success.
Credentials come from the environment (``RUCIO_CONFIG``, X.509 proxy, token).
"""

from __future__ import annotations

import json
import sys
from typing import Any


def _download(request: dict[str, Any]) -> dict[str, Any]:
    from rucio.client import Client
    from rucio.client.downloadclient import DownloadClient

    item: dict[str, Any] = {
        "did": request["did"],
        "base_dir": request["directory"],
        "no_subdir": True,
        "transfer_timeout": int(request.get("timeout", 3600)),
    }
    if request.get("rse"):
        item["rse"] = request["rse"]
    client = DownloadClient(client=Client())
    results = client.download_dids([item], trace_custom_fields=request.get("trace", {}))
    states = [r.get("clientState") for r in results]
    if not results or any(s not in ("DONE", "ALREADY_DONE") for s in states):
        return {"ok": False, "error": f"download states {states}", "missing": False}
    result = results[0]
    return {"ok": True, "paths": result.get("dest_file_paths", []), "adler32": result.get("adler32")}


def _upload(request: dict[str, Any]) -> dict[str, Any]:
    from rucio.client import Client
    from rucio.client.uploadclient import UploadClient

    item: dict[str, Any] = {
        "path": request["path"],
        "rse": request["rse"],
        "did_scope": request["scope"],
        "did_name": request["name"],
        "register_after_upload": True,
        "transfer_timeout": int(request.get("timeout", 3600)),
    }
    if request.get("guid"):
        item["guid"] = request["guid"]
    summary = request["summary"]
    client = UploadClient(_client=Client())
    if isinstance(getattr(client, "trace", None), dict):
        client.trace.update(request.get("trace", {}))
    status = client.upload([item], summary_file_path=summary)
    if status != 0:
        return {"ok": False, "error": f"upload returned {status}", "missing": False}
    with open(summary, encoding="utf-8") as handle:
        summary_document: dict[str, dict[str, Any]] = json.load(handle)
    entry: dict[str, Any] = next(iter(summary_document.values()), {})
    return {"ok": True, "pfn": entry.get("pfn", ""), "adler32": entry.get("adler32")}


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("download", "upload"):
        sys.stdout.write(
            json.dumps({"ok": False, "error": "usage: download|upload JSON", "missing": False}) + "\n"
        )
        return 2
    request = json.loads(argv[2])
    try:
        result = _download(request) if argv[1] == "download" else _upload(request)
    except Exception as exc:  # noqa: BLE001 - reported to the pilot as text, classified there
        name = type(exc).__name__
        missing = name in ("DataIdentifierNotFound", "NoFilesDownloaded", "SourceNotFound")
        result = {"ok": False, "error": f"{name}: {exc}", "missing": missing}
    sys.stdout.write(json.dumps(result) + "\n")
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
