"""
Pure pieces of the SMTP protocol shared by the server: reply formatting,
path and parameter parsing (RFC 5321, RFC 1870, RFC 6152, RFC 3461,
RFC 6531), the DATA dot-decoder and the Received trace header.

Owns: bytes and strings in, values or L{CommandError} out.  No I/O, no
reactor, no session state.

Must not touch: sockets, the spool, the clock (callers pass times in), the
relay decision (L{mailhub.policy}).  The protocol itself is
L{mailhub.smtpd}, which imports everything here back.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import Any

from .policy import Reply

__all__ = [
    "DotDecoder",
    "CommandError",
    "format_reply",
    "split_path",
    "parse_params",
    "parse_mail_params",
    "parse_rcpt_params",
    "xtext_decode",
    "with_protocol",
    "received_header",
    "MAX_LINE",
    "MAX_AUTH_LINE",
    "MAX_MAIL_LINE",
    "HopCounter",
    "END_MARKER",
    "TOO_BIG",
    "NEED_HELO",
    "COMMAND",
    "DATA",
    "BDAT",
    "DISCARD",
    "SASL",
    "trace_header",
]

#: RFC 5321 4.5.3.1.4: a command line is at most 512 octets including CRLF.
MAX_LINE = 512
#: RFC 4954 4: AUTH command lines and SASL responses may be up to 12288 octets.
MAX_AUTH_LINE = 12288
#: MAIL and RCPT lines with extension parameters: RFC 5321 4.5.3.1.4 allows
#: extensions to raise the 512 octets (RFC 1870 +26, RFC 3461 +100 for MAIL
#: and +500 for RCPT, ...); like Postfix (line_length_limit) 2048 octets.
MAX_MAIL_LINE = 2048
END_MARKER = b"\r\n.\r\n"
_DIGITS = re.compile(r"[0-9]{1,20}\Z")
_NOTIFY = {"SUCCESS", "FAILURE", "DELAY"}

TOO_BIG = Reply(552, "5.3.4", "Error: message size exceeds fixed limit")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")

#: What a session's next input bytes are: command lines, DATA content, a
#: BDAT chunk, the rest of a too long line (discarded), a SASL response.
COMMAND, DATA, BDAT, DISCARD, SASL = "command", "data", "bdat", "discard", "sasl"


def _fields(reply: Reply) -> tuple[int, str, str]:
    return reply.code, reply.enhanced, reply.text


class CommandError(Exception):
    """A command cannot be accepted; carries the L{Reply} to send."""

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(text)
        self.reply = Reply(code, enhanced, text)


# -- pure helpers ------------------------------------------------------------------------


def format_reply(code: int, enhanced: str, text: str | list[str]) -> bytes:
    """
    The bytes of a (possibly multi-line) reply; C{enhanced} may be C{""}.
    CR and LF inside the text are replaced so a reply is never split.
    """
    lines = [text] if isinstance(text, str) else list(text)
    out = []
    for i, line in enumerate(lines):
        sep = "-" if i < len(lines) - 1 else " "
        line = line.replace("\r", " ").replace("\n", " ")
        out.append(f"{code}{sep}{enhanced} {line}\r\n" if enhanced else f"{code}{sep}{line}\r\n")
    return "".join(out).encode("utf-8", "replace")


def split_path(arg: str) -> tuple[str, list[str]]:
    """
    Split what follows C{MAIL FROM:} / C{RCPT TO:} into the path and the
    parameter words.  A C{>} inside a quoted local part does not end the path.
    """
    arg = arg.lstrip(" ")
    if not arg.startswith("<"):
        path, _, rest = arg.partition(" ")
        return path, rest.split()
    i = arg.find(">")
    if i < 0 or '"' in arg[:i]:
        i = _path_end(arg)
    path, rest = arg[: i + 1], arg[i + 1 :]
    if rest and not rest.startswith(" "):
        raise CommandError(501, "5.5.4", "Error: bad parameter syntax")
    return path, rest.split()


def _path_end(arg: str) -> int:
    """
    The index of the C{>} that ends the path C{arg} starts with, skipping
    quoted strings (and their backslash escapes) in its local part: the
    slow way, only for paths with a quote before their first C{>}.
    """
    i, quoted = 1, False
    while i < len(arg):
        c = arg[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == ">":
            break
        i += 1
    else:
        raise CommandError(501, "5.1.3", "Error: bad address syntax")
    return i


def parse_params(words: list[str]) -> dict[str, str | None]:
    """C{["SIZE=10", "SMTPUTF8"]} -> C{{"SIZE": "10", "SMTPUTF8": None}} (keys upper-cased)."""
    params: dict[str, str | None] = {}
    for word in words:
        key, eq, value = word.partition("=")
        key = key.upper()
        if not key or (eq and not value) or not key.isascii() or not key.replace("-", "").isalnum():
            raise CommandError(501, "5.5.4", f"Error: bad parameter syntax: {word}")
        if key in params:
            raise CommandError(501, "5.5.4", f"Error: duplicate parameter: {key}")
        params[key] = value if eq else None
    return params


def xtext_decode(text: str) -> str:
    """RFC 3461 4: decode C{+XX} hex escapes; anything else malformed is a 501."""
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "+":
            hx = text[i + 1 : i + 3]
            if len(hx) != 2 or not all(h in "0123456789ABCDEF" for h in hx):
                raise CommandError(501, "5.5.4", "Error: bad xtext encoding")
            out.append(chr(int(hx, 16)))
            i += 3
            continue
        if not ("!" <= c <= "~") or c == "=":
            raise CommandError(501, "5.5.4", "Error: bad xtext encoding")
        out.append(c)
        i += 1
    return "".join(out)


def _no_value(key: str, value: str | None) -> None:
    if value is not None:
        raise CommandError(501, "5.5.4", f"Error: {key} takes no value")


def parse_mail_params(params: dict[str, str | None], max_size: int) -> dict[str, Any]:
    """
    MAIL FROM parameters -> the C{esmtp} fields of the envelope.  SIZE over
    C{max_size} (0 = no limit) is 552 5.3.4; unknown keywords 555 5.5.4.
    """
    esmtp: dict[str, Any] = {"body": "7BIT", "smtputf8": False}
    for key, value in params.items():
        if key == "SIZE":
            if value is None or not _DIGITS.match(value):
                raise CommandError(501, "5.5.4", "Error: bad SIZE parameter")
            if max_size and int(value) > max_size:
                raise CommandError(*_fields(TOO_BIG))
            esmtp["declared_size"] = int(value)
        elif key == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                raise CommandError(501, "5.5.4", "Error: BODY must be 7BIT or 8BITMIME")
            esmtp["body"] = value.upper()
        elif key == "SMTPUTF8":
            _no_value(key, value)
            esmtp["smtputf8"] = True
        elif key == "RET":
            if value is None or value.upper() not in ("FULL", "HDRS"):
                raise CommandError(501, "5.5.4", "Error: RET must be FULL or HDRS")
            esmtp["ret"] = value.upper()
        elif key == "ENVID":
            envid = xtext_decode(value or "")
            if not envid or len(envid) > 100:
                raise CommandError(501, "5.5.4", "Error: bad ENVID parameter")
            esmtp["envid"] = envid
        else:
            raise CommandError(555, "5.5.4", f"Error: unsupported parameter: {key}")
    return esmtp



def parse_rcpt_params(params: dict[str, str | None]) -> tuple[list[str], str]:
    """RCPT TO parameters (RFC 3461 NOTIFY, ORCPT) -> (notify, orcpt)."""
    notify: list[str] = []
    orcpt = ""
    for key, value in params.items():
        if key == "NOTIFY":
            words = [w.upper() for w in (value or "").split(",")]
            if words != ["NEVER"] and not (words and set(words) <= _NOTIFY and len(set(words)) == len(words)):
                raise CommandError(501, "5.5.4", "Error: bad NOTIFY parameter")
            notify = words
        elif key == "ORCPT":
            kind, semi, addr = (value or "").partition(";")
            if not semi or not kind or not addr:
                raise CommandError(501, "5.5.4", "Error: bad ORCPT parameter")
            orcpt = f"{kind};{xtext_decode(addr)}"
        else:
            raise CommandError(555, "5.5.4", f"Error: unsupported parameter: {key}")
    return notify, orcpt


def with_protocol(esmtp: bool, tls: bool, authenticated: bool, smtputf8: bool) -> str:
    """The C{with} keyword of the Received header (RFC 3848, RFC 6531 7.7)."""
    if not esmtp:
        return "SMTP"
    base = "UTF8SMTP" if smtputf8 else "ESMTP"
    return base + ("S" if tls else "") + ("A" if authenticated else "")


def trace_header(clauses: list[str], date: str) -> bytes:
    """
    A C{Received:} trace header (RFC 5321 4.4): the clauses (C{from ...},
    C{by ...}, C{for <...>}) one per folded line, then C{; DATE}.  Every
    way into the spool (SMTP, the pickup directory, HTTP) writes its trace
    header with this function; only the clauses differ.
    """
    return ("Received: " + "\r\n\t".join(clauses) + f"; {date}\r\n").encode("utf-8")


def received_header(
    helo: str,
    ip: str,
    hostname: str,
    proto: str,
    queue_id: str,
    rcpt: str | None,
    when: float,
    auth_user: str | None = None,
    hide_client: bool = False,
) -> bytes:
    """
    The trace header written before the message (RFC 5321 4.4).  C{rcpt}
    is given only when the message has exactly one recipient.

    @param auth_user: when given, an C{(Authenticated sender: USER)}
        comment follows the C{from} clause (Postfix
        smtpd_sasl_authenticated_header).
    @param hide_client: leave out the C{from} clause (the client's HELO
        name and IP address) for the privacy of authenticated submission
        clients: C{Received: by HOST (mailhub) with ESMTPSA id QID}.
    """
    clauses = []
    if not hide_client:
        clauses.append(f"from {helo} ([{ip}])")
        if auth_user:
            clauses.append(f"(Authenticated sender: {auth_user})")
    clauses.append(f"by {hostname} (mailhub) with {proto} id {queue_id}")
    if rcpt is not None:
        clauses.append(f"for <{rcpt}>")
    return trace_header(clauses, rfc5322_date(when))


_last_date: tuple[int, str] = (-1, "")


def rfc5322_date(when: float) -> str:
    """
    C{when} as an RFC 5322 date in UTC (C{Sat, 28 Nov 2026 18:43:28 +0000}),
    made once per second: every message's trace header asks for it, and
    C{email.utils.format_datetime} is slow Python.
    """
    global _last_date
    second = int(when)
    cached = _last_date
    if cached[0] == second:
        return cached[1]
    text = format_datetime(datetime.fromtimestamp(second, timezone.utc))
    _last_date = (second, text)
    return text


def _marker_prefix_len(data: bytes) -> int:
    for k in (4, 3, 2, 1):
        if data.endswith(END_MARKER[:k]):
            return k
    return 0


class DotDecoder:
    """
    Incremental decoder of DATA content (RFC 5321 4.5.2).

    L{feed} takes each received buffer and returns the message bytes it
    completes (dot-unstuffed) and, once the end marker C{CRLF.CRLF} was seen,
    the bytes after it.  Up to 4 bytes that may start a marker are held back
    between calls, so markers split across reads at any position are found.
    A virtual CRLF precedes the data so a first line of C{"."} ends it.

    @ivar bare_line_ending: a CR not followed by LF or an LF not preceded
        by CR was seen; the message must be rejected.
    """

    def __init__(self) -> None:
        self._held = b"\r\n"
        self._skip = 2
        self.bare_line_ending = False
        self.done = False

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        work = self._held + data
        # Both the end marker and dot stuffing start with CRLF ".": one
        # search tells whether either can be there.  Each search over a
        # buffer full of CRLFs costs about 1 ms per MB (the pattern's first
        # two bytes match at every line end); most buffers of a big message
        # need only this one.
        dotted = b"\r\n." in work
        end = work.find(END_MARKER) if dotted else -1
        rest: bytes | None
        if end >= 0:
            body, rest, self._held = work[: end + 2], work[end + 5 :], b""
            self.done = True
        else:
            keep = _marker_prefix_len(work)
            cut = len(work) - keep
            body, rest, self._held = work[:cut], None, work[cut:]
        if not self.bare_line_ending:
            crlf = body.count(b"\r\n")
            if body.count(b"\r") != crlf or body.count(b"\n") != crlf:
                self.bare_line_ending = True
        if dotted and b"\r\n." in body:  # a search is a third of a replace that finds nothing
            body = body.replace(b"\r\n.", b"\r\n")
        if self._skip:
            cut = min(self._skip, len(body))
            body, self._skip = body[cut:], self._skip - cut
        return body, rest


class HopCounter:
    """
    Counts the C{Received:} header fields of a message as its bytes arrive
    (RFC 5321 6.3: a loop is detected by counting trace headers).

    Only the header section is looked at: lines up to the first empty one.
    Once it has been seen, L{feed} returns at once, so the message body
    costs nothing.  Work is done on whole buffers with bytes operations
    (C{find}, C{count}, C{lower}), never per line; a field name split
    across two buffers is found because the last few bytes are carried
    over.  Lines are split at LF, so CRLF (DATA) and bare LF (BDAT, which
    is taken as sent) are both understood.

    @ivar count: C{Received:} fields seen so far.
    @ivar done: the end of the header section has been seen.
    """

    _FIELD = b"\nreceived:"

    def __init__(self) -> None:
        self._tail = b"\n"  # a virtual line end before the message
        self.count = 0
        self.done = False

    def feed(self, data: bytes) -> None:
        if self.done or not data:
            return
        work = self._tail + data
        ends = [i for i in (work.find(b"\n\n"), work.find(b"\n\r\n")) if i >= 0]
        if ends:
            end = min(ends)
            self.count += work[:end].lower().count(self._FIELD)
            self.done = True
            self._tail = b""
            return
        # An occurrence needs len(_FIELD) bytes, one more than the tail
        # keeps: none is counted twice, none split across buffers is lost.
        self.count += work.lower().count(self._FIELD)
        self._tail = work[-(len(self._FIELD) - 1) :]
