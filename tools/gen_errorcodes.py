"""Generate ``pilot/errorcodes.py`` from ``pilot/data/error-codes.tsv``.

The TSV is the single source of PanDA's pilot error numbers, names and standard
messages.  The generated module gives mypy and readers a static enum; a test
(``tests/test_errorcodes.py``) fails when the two drift apart.

Run: ``python tools/gen_errorcodes.py`` from the repository root.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TSV = ROOT / "pilot" / "data" / "error-codes.tsv"
OUT = ROOT / "pilot" / "errorcodes.py"


def read_rows(path: Path) -> list[tuple[int, str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        return [(int(row["code"]), row["name"], row["description"]) for row in reader]


def _quoted(text: str) -> str:
    """A double-quoted Python literal, as the formatter writes it."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(rows: list[tuple[int, str, str]]) -> str:
    lines = [
        '"""PanDA pilot error codes (generated from ``pilot/data/error-codes.tsv``; do not edit).',
        "",
        "Regenerate with ``python tools/gen_errorcodes.py``.  The numbers are PanDA's and must",
        "never change: the server, monitoring and retry logic key on them.",
        '"""',
        "",
        "from enum import IntEnum",
        "",
        "",
        "class ErrorCode(IntEnum):",
        '    """A PanDA pilot error number; ``STANDARD_MESSAGES`` holds its standard text."""',
        "",
    ]
    lines += [f"    {name} = {code}" for code, name, _ in rows]
    lines += ["", "", "STANDARD_MESSAGES: dict[ErrorCode, str] = {"]
    lines += [f"    ErrorCode.{name}: {_quoted(desc)}," for _, name, desc in rows]
    lines += ["}", ""]
    return "\n".join(lines)


def main() -> int:
    OUT.write_text(render(read_rows(TSV)), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
