"""
Pure pieces of the SMTP protocol: replies as data (L{Reply},
L{CommandError}) and their formatting, path and parameter parsing (RFC
5321, RFC 1870, RFC 6152, RFC 3461, RFC 6531), the DATA dot-decoder, the
trace-header counter and the SMTP clauses of the Received header.

Owns: bytes and strings in, values or L{CommandError} out.  No I/O, no
reactor, no session state.  L{Reply} is the contract every SMTP module
answers with: L{mailhub.smtp.policy} imports it from here, never the
reverse.

Must not touch: sockets, the spool, the clock (callers pass times in), the
relay decision (L{mailhub.smtp.policy}), the message format itself (dates
and trace headers are L{mailhub.rfc5322}'s).  The protocol itself is
L{mailhub.smtp.server}.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mailhub.rfc5322 import address_literal, format_date, trace_header

__all__ = [
    "Reply",
    "DotDecoder",
    "CommandError",
    "format_reply",
    "reply_text",
    "echo",
    "MAX_REPLY_LINE",
    "MAX_ECHO",
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
]

#: RFC 5321 4.5.3.1.4: a command line is at most 512 octets including CRLF.
MAX_LINE = 512
#: RFC 4954 4: AUTH command lines and SASL responses may be up to 12288 octets.
MAX_AUTH_LINE = 12288
#: MAIL and RCPT lines with extension parameters: RFC 5321 4.5.3.1.4 allows
#: extensions to raise the 512 octets (RFC 1870 +26, RFC 3461 +100 for MAIL
#: and +500 for RCPT, ...); like Postfix (line_length_limit) 2048 octets.
MAX_MAIL_LINE = 2048
#: RFC 5321 4.5.3.1.5: a reply line is at most 512 octets including CRLF.
MAX_REPLY_LINE = 512
#: Characters of client input (a parameter, a keyword) a reply may quote.
MAX_ECHO = 64
END_MARKER = b"\r\n.\r\n"
_DIGITS = re.compile(r"[0-9]{1,20}\Z")
_NOTIFY = {"SUCCESS", "FAILURE", "DELAY"}


@dataclass(frozen=True)
class Reply:
    """An SMTP reply as data: C{550}, C{"5.1.1"}, C{"User unknown"}."""

    code: int
    enhanced: str
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400


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


#: What reply text may not carry as it is: C0 controls, DEL, C1 controls
#: and the Unicode line and paragraph separators (CR and LF become spaces).
_UNPRINTABLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029]")
_NON_ASCII = re.compile("[^\x00-\x7f]+")


def _escape_octets(m: re.Match[str]) -> str:
    return "".join(f"\\x{b:02X}" for b in m.group(0).encode("utf-8", "surrogatepass"))


def reply_text(text: str, utf8: bool = False) -> str:
    """
    C{text} made safe for one reply line: CR and LF become spaces, other
    control characters C{\\xNN}; non-ASCII characters become C{\\xNN} per
    UTF-8 octet (RFC 5321 4.2: reply text is US-ASCII) unless C{utf8}
    (the client announced SMTPUTF8 for the transaction, RFC 6531).
    """
    if text.isascii() and text.isprintable():
        return text  # nearly every reply: nothing to change (checked in C)
    text = text.replace("\r", " ").replace("\n", " ")
    text = _UNPRINTABLE.sub(_escape_octets, text)
    if not utf8:
        text = _NON_ASCII.sub(_escape_octets, text)
    return text


def echo(text: str, limit: int = MAX_ECHO) -> str:
    """
    Client input quoted in a reply: at most C{limit} characters (then
    C{...}); escaping is left to L{format_reply}, which every reply goes
    through.
    """
    return text if len(text) <= limit else text[:limit] + "..."


def format_reply(code: int, enhanced: str, text: str | list[str], utf8: bool = False) -> bytes:
    """
    The bytes of a (possibly multi-line) reply; C{enhanced} may be C{""}.
    Every line goes through L{reply_text} (never split by CR/LF, ASCII
    unless C{utf8}) and is cut to L{MAX_REPLY_LINE} octets including its
    CRLF, ending in C{...} when cut (RFC 5321 4.5.3.1.5): the last line of
    defence, whatever a caller put into the text.
    """
    if isinstance(text, str):
        head = f"{code} {enhanced} " if enhanced else f"{code} "
        body = reply_text(text, utf8).encode("utf-8", "replace")
        if len(head) + len(body) <= MAX_REPLY_LINE - 2:
            return head.encode("ascii") + body + b"\r\n"  # one line that fits: the common case
    lines = [text] if isinstance(text, str) else list(text)
    out = []
    for i, line in enumerate(lines):
        sep = "-" if i < len(lines) - 1 else " "
        head = f"{code}{sep}{enhanced} " if enhanced else f"{code}{sep}"
        body = reply_text(line, utf8).encode("utf-8", "replace")
        room = MAX_REPLY_LINE - 2 - len(head)
        if len(body) > room:
            body = body[: room - 3].decode("utf-8", "ignore").encode("utf-8") + b"..."
        out.append(head.encode("ascii") + body + b"\r\n")
    return b"".join(out)


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
            raise CommandError(501, "5.5.4", f"Error: bad parameter syntax: {echo(word)}")
        if key in params:
            raise CommandError(501, "5.5.4", f"Error: duplicate parameter: {echo(key)}")
        params[key] = value if eq else None
    return params


def xtext_decode(text: str, name: str = "xtext") -> str:
    """
    RFC 3461 4: decode C{+XX} hex escapes (upper-case hex digits); a bad
    escape or a character outside xchar (C{!} to C{~} but C{+} and C{=})
    is C{501 5.5.4 Error: bad NAME parameter}.
    """
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "+":
            hx = text[i + 1 : i + 3]
            if len(hx) != 2 or not all(h in "0123456789ABCDEF" for h in hx):
                raise CommandError(501, "5.5.4", f"Error: bad {name} parameter")
            out.append(chr(int(hx, 16)))
            i += 3
            continue
        if not ("!" <= c <= "~") or c == "=":
            raise CommandError(501, "5.5.4", f"Error: bad {name} parameter")
        out.append(c)
        i += 1
    return "".join(out)


#: RFC 3461 4.2 and 4.4: decoded ENVID and ORCPT values are printable US-ASCII.
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*\Z")
#: RFC 3461 4.2: addr-type is an atom (RFC 5322 atext).
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,64}\Z")
#: RFC 3461 4.2: the ORCPT value is at most 500 characters.
MAX_ORCPT = 500
#: RFC 3461 4.4: the ENVID value is at most 100 characters.
MAX_ENVID = 100


def _printable_xtext(value: str, name: str) -> str:
    """An xtext value decoded, refused unless it is printable US-ASCII (no control characters, no UTF-8)."""
    decoded = xtext_decode(value, name)
    if not _PRINTABLE_ASCII.match(decoded):
        raise CommandError(501, "5.5.4", f"Error: bad {name} parameter: printable US-ASCII only")
    return decoded


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
            envid = _printable_xtext(value or "", "ENVID")
            if not envid or len(envid) > MAX_ENVID:
                raise CommandError(501, "5.5.4", "Error: bad ENVID parameter")
            esmtp["envid"] = envid
        else:
            raise CommandError(555, "5.5.4", f"Error: unsupported parameter: {echo(key)}")
    return esmtp



def parse_rcpt_params(params: dict[str, str | None]) -> tuple[list[str], str]:
    """
    RCPT TO parameters (RFC 3461 NOTIFY, ORCPT) -> (notify, orcpt).  ORCPT
    is C{addr-type ";" xtext}, at most 500 characters; its decoded address
    must be printable US-ASCII (the UTF-8 address types of RFC 6533 are
    not supported).
    """
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
            if not semi or not _ADDR_TYPE.match(kind) or not addr or len(value or "") > MAX_ORCPT:
                raise CommandError(501, "5.5.4", "Error: bad ORCPT parameter")
            orcpt = f"{kind};{_printable_xtext(addr, 'ORCPT')}"
        else:
            raise CommandError(555, "5.5.4", f"Error: unsupported parameter: {echo(key)}")
    return notify, orcpt


def with_protocol(esmtp: bool, tls: bool, authenticated: bool, smtputf8: bool) -> str:
    """The C{with} keyword of the Received header (RFC 3848, RFC 6531 7.7)."""
    if not esmtp:
        return "SMTP"
    base = "UTF8SMTP" if smtputf8 else "ESMTP"
    return base + ("S" if tls else "") + ("A" if authenticated else "")


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
        clauses.append(f"from {helo} ({address_literal(ip)})")
        if auth_user:
            clauses.append(f"(Authenticated sender: {auth_user})")
    clauses.append(f"by {hostname} (mailhub) with {proto} id {queue_id}")
    if rcpt is not None:
        clauses.append(f"for <{rcpt}>")
    return trace_header(clauses, format_date(when))


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
            # A CR or LF left once every CRLF is removed is a bare one.  One
            # replace and two memchr-fast searches: a third fewer instructions
            # per MB than counting CRLF, CR and LF (three slow counts).
            paired = body.replace(b"\r\n", b"")
            if b"\r" in paired or b"\n" in paired:
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
