"""The fault suite (issue 13): a real pilot against the dev server under injected faults.

Each scenario asserts the job's final state on the server and that no file and no update
is lost or duplicated, and records its outcome (``outcomes``) for ``docs/reliability.md``
(``tools/reliability_table.py``).
"""
