"""
The message format (RFC 5322) as every way into the spool needs it: what a
header field line looks like, which fields a header section has, the
C{Date:} and C{Message-ID:} fields a submission is completed with, dates,
and the C{Received:} trace header (RFC 5321 4.4) written before a message.

Owns: bytes and times in, bytes and strings out.  Pure: no I/O, no reactor,
no clock (every function that writes a date takes the time as C{when}, in
seconds since the epoch, from its caller's clock).

Must not touch: SMTP parsing and replies (L{mailhub.smtp.proto}, which
builds the SMTP clauses of its trace header on L{trace_header}), MIME
structure (L{mailhub.web.mime}, L{mailhub.relay.downgrade}), the spool.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, formatdate

__all__ = [
    "FIELD_LINE",
    "is_field_line",
    "field_name",
    "HeaderSection",
    "scan_header",
    "format_date",
    "message_id",
    "missing_fields",
    "complete_header",
    "trace_header",
    "after_trace_header",
    "address_literal",
]

#: The start of a header field line: a field name (printable US-ASCII but
#: the colon, RFC 5322 3.6.8), optional white space before the colon (the
#: obsolete syntax of RFC 5322 4.5), the colon.
FIELD_LINE = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")


def is_field_line(line: bytes) -> bool:
    """Whether C{line} starts a header field (C{Name: value}, C{Name : value})."""
    return FIELD_LINE.match(line) is not None


def field_name(line: bytes) -> bytes:
    """The name of the field C{line} starts, in lower case, without the white space before the colon."""
    return line.split(b":", 1)[0].strip().lower()


@dataclass(frozen=True)
class HeaderSection:
    """
    What L{scan_header} found: the field C{names} (lower case), C{end},
    the offset just past the last header line (where fields are added),
    and C{separator}, whether the empty line that ends the section is there
    (at C{end}).
    """

    names: frozenset[bytes]
    end: int
    separator: bool


def scan_header(message: bytes) -> HeaderSection:
    """
    The header section of C{message} (CRLF lines).  It ends at the empty
    line, at the first line that is neither a header field nor the
    continuation (folded line, starting with white space) of one, or at the
    end of the message.  A line that ends in a bare LF or CR is one line
    with the rest up to the next CRLF, as the SMTP server stores it.
    """
    names: set[bytes] = set()
    pos = 0
    n = len(message)
    while pos < n:
        nl = message.find(b"\r\n", pos)
        end = n if nl < 0 else nl + 2
        line = message[pos:end]
        if line == b"\r\n":
            return HeaderSection(frozenset(names), pos, True)
        if line[:1] in (b" ", b"\t") and names:
            pass  # continuation of the field before
        elif is_field_line(line):
            names.add(field_name(line))
        else:
            break  # not a header field: the body starts here
        pos = end
    return HeaderSection(frozenset(names), pos, False)


_last_utc: tuple[int, str] = (-1, "")


def format_date(when: float, localtime: bool = False) -> str:
    """
    C{when} as an RFC 5322 date-time: in UTC (C{Sat, 28 Nov 2026 18:43:28
    +0000}), or with C{localtime} in the local time zone and its offset (as
    local submissions and their trace headers show it).  The UTC form is
    made once per second: every message's trace header asks for it, and
    C{email.utils.format_datetime} is slow Python.
    """
    global _last_utc
    if localtime:
        return formatdate(when, localtime=True)
    second = int(when)
    cached = _last_utc
    if cached[0] == second:
        return cached[1]
    text = format_datetime(datetime.fromtimestamp(second, UTC))
    _last_utc = (second, text)
    return text


def message_id(domain: str, when: float, token: str | None = None) -> str:
    """
    A new C{Message-ID} value, C{<YYYYMMDDHHMMSS.TOKEN@domain>} (RFC 5322
    3.6.4): the UTC time of C{when} and C{token}, 64 random bits in hex
    unless given, so that it is unique without any state.
    """
    if token is None:
        token = secrets.token_hex(8)
    return f"<{time.strftime('%Y%m%d%H%M%S', time.gmtime(when))}.{token}@{domain}>"


def missing_fields(
    names: Collection[bytes],
    domain: str,
    when: float,
    prefix: str = "",
    localtime: bool = False,
    token: str | None = None,
) -> list[str]:
    """
    The C{Date:} and C{Message-ID:} fields (without line ends) a header
    section with the field C{names} (lower case) lacks: RFC 5322 3.6
    requires Date, and Postfix's cleanup adds both to submissions.  With
    C{prefix="Resent-"} they are C{Resent-Date:} and C{Resent-Message-ID:}
    (RFC 5322 3.6.6, for a resent message).
    """
    fields = []
    if (prefix.lower() + "date").encode("ascii") not in names:
        fields.append(f"{prefix}Date: {format_date(when, localtime)}")
    if (prefix.lower() + "message-id").encode("ascii") not in names:
        fields.append(f"{prefix}Message-ID: {message_id(domain, when, token)}")
    return fields


def complete_header(message: bytes, domain: str, when: float, token: str | None = None) -> bytes:
    """
    C{message} (CRLF lines) with C{Date:} and C{Message-ID: <...@domain>}
    added at the end of its header section when missing.  Only the header
    section is looked at and only added to: the body stays byte for byte.
    When the section does not end in an empty line (a message without a
    body, or a first line that is not a header field) the empty line is
    inserted after the added fields, as sendmail does.
    """
    header = scan_header(message)
    added = "".join(f + "\r\n" for f in missing_fields(header.names, domain, when, token=token)).encode("utf-8")
    rest = message[header.end :]
    if not header.separator:
        rest = b"\r\n" + rest
    return message[: header.end] + added + rest


def trace_header(clauses: list[str], date: str) -> bytes:
    """
    A C{Received:} trace header (RFC 5321 4.4): the clauses (C{from ...},
    C{by ...}, C{for <...>}) one per folded line, then C{; DATE}.  Every
    way into the spool (SMTP, the pickup directory, HTTP) writes its trace
    header with this function; only the clauses differ.
    """
    return ("Received: " + "\r\n\t".join(clauses) + f"; {date}\r\n").encode("utf-8")


def after_trace_header(content: bytes) -> bytes:
    """
    What must stand between a trace header and the content that follows
    it: nothing, or the empty line that ends the header section when the
    content's first line starts with white space.  Such a line is no
    header field (RFC 5322 2.2: a field starts with its name), so that
    content has no header section; without the empty line it would fold
    into our trace header as a continuation line and change what the
    header says.
    """
    return b"\r\n" if content[:1] in (b" ", b"\t") else b""


def address_literal(ip: str) -> str:
    """
    A client's IP address as an RFC 5321 4.1.3 address literal for a
    trace header: C{[192.0.2.1]}, C{[IPv6:2001:db8::1]} (a zone index
    such as C{%eth0} is not part of the syntax and is left out).  Log
    lines keep Postfix's C{[2001:db8::1]}.
    """
    if ":" in ip:
        return f"[IPv6:{ip.partition('%')[0]}]"
    return f"[{ip}]"
