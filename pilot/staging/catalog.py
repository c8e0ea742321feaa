"""``PoolFileCatalog.xml``: how a payload finds inputs it reads remotely (direct access).

The POOL file catalogue maps each input's GUID and LFN to the URL (TURL) the
payload should open.  ROOT-based frameworks read it as is; other payloads get its
path through the experiment plug-in's environment.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from pathlib import Path

from pilot.staging.plan import DirectInput


def render_catalog(entries: Sequence[tuple[str, str, str]]) -> str:
    """The catalogue for (guid, lfn, url) triples."""
    lines = [
        '<?xml version="1.0" encoding="UTF-8" standalone="no" ?>',
        "<!-- Edited By POOL -->",
        '<!DOCTYPE POOLFILECATALOG SYSTEM "InMemory">',
        "<POOLFILECATALOG>",
    ]
    for guid, lfn, url in entries:
        lines += [
            f"  <File ID={quoteattr(guid)}>",
            "    <physical>",
            f'      <pfn filetype="ROOT_All" name={quoteattr(url)}/>',
            "    </physical>",
            "    <logical>",
            f"      <lfn name={quoteattr(lfn)}/>",
            "    </logical>",
            "  </File>",
        ]
    lines.append("</POOLFILECATALOG>")
    return "\n".join(lines) + "\n"


def quoteattr(value: str) -> str:
    """``value`` as a double-quoted XML attribute (``&<>"'`` escaped)."""
    return f'"{escape(value, quote=True)}"'


def write_catalog(
    workdir: Path,
    direct: Sequence[DirectInput],
    local: Sequence[tuple[str, str]],
    name: str = "PoolFileCatalog.xml",
) -> Path:
    """Write the catalogue: remote TURLs for direct-access inputs, local paths for copies."""
    entries = [(d.guid, d.lfn, d.turl) for d in direct]
    entries += [(guid, lfn, f"file:{workdir / lfn}") for guid, lfn in local]
    path = workdir / name
    path.write_text(render_catalog(entries), encoding="utf-8")
    return path
