"""
The Authentication-Results header field (RFC 8601): writing ours, and
finding the ones that claim to be ours.

Owns: L{results_field} (one field: the authserv-id, then C{spf=},
C{dkim=} per signature, C{dmarc=}, each on its own folded line, every
value a token or a quoted string, comments cut and stripped of
parentheses), L{authserv_id} (the first token of a field's value after
its comments) and L{strip_ours} (a header section without the fields
carrying our authserv-id, RFC 8601 5).

Must not touch: the checks themselves, the message body.  Pure.
"""

from __future__ import annotations

import re

from mailhub.auth.dkimcheck import DKIMResult
from mailhub.auth.dmarc import DMARCResult
from mailhub.auth.spfcheck import SPFResult

__all__ = ["results_field", "authserv_id", "strip_ours", "FIELD"]

FIELD = b"Authentication-Results"
#: RFC 2045 token characters (what needs no quotes)
_TOKEN = re.compile(r"^[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+$")
_NAME = re.compile(rb"^authentication-results[ \t]*:", re.I)


def _value(text: str) -> str:
    text = text[:254]
    if _TOKEN.match(text):
        return text
    return '"' + "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "?" for c in text) + '"'


#: RFC 8601 pvalue's local-part "@" domain-name, when the local part is a dot-atom
_ADDRESS = re.compile(r"^[!#$%&'*+\-/=?^_`{|}~0-9A-Za-z]+(?:\.[!#$%&'*+\-/=?^_`{|}~0-9A-Za-z]+)*@[0-9A-Za-z.-]+$")


def _pvalue(text: str) -> str:
    return text if len(text) <= 254 and _ADDRESS.match(text) else _value(text)


def _comment(text: str) -> str:
    text = "".join(c if 32 <= ord(c) < 127 and c not in "()\\" else " " for c in text[:100]).strip()
    return f" ({text})" if text else ""


def results_field(server: str, spf: SPFResult, dkim: list[DKIMResult], dmarc: DMARCResult) -> bytes:
    """Our Authentication-Results field, CRLF line ends."""
    parts = []
    prop = "smtp.mailfrom" if spf.identity == "mailfrom" else "smtp.helo"
    spf_part = f"spf={spf.result}{_comment(spf.reason) if spf.result != 'pass' else ''}"
    if spf.value:
        spf_part += f" {prop}={_pvalue(spf.value)}"
    parts.append(spf_part)
    for r in dkim:
        part = f"dkim={r.result}{_comment(r.reason)}"
        if r.domain:
            part += f" header.d={_value(r.domain)}"
        if r.selector:
            part += f" header.s={_value(r.selector)}"
        if r.algorithm:
            part += f" header.a={_value(r.algorithm)}"
        if r.b:
            part += f" header.b={_value(r.b)}"
        parts.append(part)
    dmarc_part = f"dmarc={dmarc.result}"
    comment = f"p={dmarc.policy}" if dmarc.policy else dmarc.reason
    dmarc_part += _comment(comment)
    if dmarc.from_domain:
        dmarc_part += f" header.from={_value(dmarc.from_domain)}"
    parts.append(dmarc_part)
    return (f"Authentication-Results: {server};\r\n\t" + ";\r\n\t".join(parts) + "\r\n").encode("ascii")


def _strip_comments(value: str) -> str:
    out, depth, escaped = [], 0, False
    for c in value:
        if escaped:
            escaped = False
            continue
        if c == "\\":
            escaped = True
        elif c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
        elif not depth:
            out.append(c)
    return "".join(out)


def authserv_id(value: bytes) -> str:
    """The authserv-id of an Authentication-Results field's value (after the colon)."""
    text = _strip_comments(value.decode("utf-8", "replace")).strip()
    first = re.split(r"[;\s]", text, maxsplit=1)[0] if text else ""
    return first.strip('"').lower().rstrip(".")


def _fields(header: bytes) -> list[bytes]:
    """The header section split into fields (each with its continuation lines and CRLFs)."""
    lines = header.split(b"\r\n")
    out: list[bytes] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and out:
            out[-1] += b"\r\n" + line
        else:
            out.append(line)
    return out


def strip_ours(header: bytes, server: str) -> tuple[bytes, int]:
    """
    C{header} (a header section with its final empty line, CRLF) without
    the Authentication-Results fields whose authserv-id is C{server};
    and how many were removed.
    """
    ours = server.lower().rstrip(".")
    kept, removed = [], 0
    for one in _fields(header):
        if _NAME.match(one) and authserv_id(one.split(b":", 1)[1]) == ours:
            removed += 1
            continue
        kept.append(one)
    return b"\r\n".join(kept), removed
