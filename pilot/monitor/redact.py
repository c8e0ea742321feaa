"""Removing secrets from text that leaves the node (debug heartbeats, diagnostics).

A payload's output can contain what it should not: bearer tokens, JWTs (WLCG/SciTokens
and OIDC tokens are JWTs), proxy PEM blocks, passwords and keys in ``key=value`` or
JSON form, signed-URL signatures, AWS keys.  Each is replaced by ``[REDACTED]``; the text
around it stays, so an operator still sees what happened.

Patterns cannot recognise a bare value (an S3 secret key, an opaque token): the values
the pilot knows are removed first, by value (``pilot.util.secrets.SecretValues``).
First, because a pattern may stop inside a value (``key=value`` stops at ``&`` or a
quote) and would leave a part that the value search can no longer find.
"""

from __future__ import annotations

import re

from pilot.util.secrets import SecretValues

MARK = "[REDACTED]"

_PEM = re.compile(r"-----BEGIN [A-Z0-9 ]+-----.*?(?:-----END [A-Z0-9 ]+-----|\Z)", re.S)

#: (cheap lower-case substring that must be on the line, pattern, replacement).  The
#: substring test skips almost every line of ordinary output before any regex runs:
#: debug heartbeats redact 16 kB every few seconds on a busy worker node.
_LINE_RULES: tuple[tuple[tuple[str, ...], re.Pattern[str], str], ...] = (
    # JWTs: three base64url parts, the first one a JSON header ("eyJ")
    (("eyj",), re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"), MARK),
    # Authorization headers
    (("bearer", "basic"), re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"), r"\1 " + MARK),
    # AWS access key ids
    (("akia", "asia"), re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"), MARK),
    # key=value, key: value, "key": "value" for secret-looking keys
    (
        ("token", "secret", "passw", "key", "credential", "sig"),
        re.compile(
            r"(?i)(\"?(?:[A-Za-z0-9_.-]*(?:token|secret|passw(?:or)?d|passwd|api[_-]?key|access[_-]?key"
            r"|private[_-]?key|credential|signature|x-amz-signature)[A-Za-z0-9_.-]*"
            # "sig" alone is a key (an Azure SAS signature), not a part of one ("SIGTERM:")
            r"|(?<![A-Za-z0-9_.-])sig)\"?\s*[:=]\s*)"
            r"(\"[^\"]*\"|'[^']*'|[^\s&,;\"']+)"
        ),
        r"\1" + MARK,
    ),
)


def redact(text: str, secrets: SecretValues | None = None) -> str:
    """``text`` with every known secret value and every secret-looking part replaced by ``[REDACTED]``."""
    if secrets is not None:
        text = secrets.redact(text, MARK)
    if "-----BEGIN " in text:
        text = _PEM.sub(MARK, text)
    lowered = text.lower()
    active = [rule for rule in _LINE_RULES if any(needle in lowered for needle in rule[0])]
    if not active:
        return text
    lines = text.split("\n")
    for index, line in enumerate(lines):
        lowered_line = line.lower()
        for needles, pattern, replacement in active:
            if any(needle in lowered_line for needle in needles):
                line = pattern.sub(replacement, line)
                lowered_line = line.lower()
        lines[index] = line
    return "\n".join(lines)
