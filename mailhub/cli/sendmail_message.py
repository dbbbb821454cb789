"""
What mailhub-sendmail does to a locally submitted message and its addresses.

Owns: the header fix-ups of local submissions (Date, Message-ID, From --
or their Resent- forms -- added when missing; Bcc and Resent-Bcc removed;
bare names in address headers qualified with the origin domain, Postfix
append_at_myorigin), C{-t} recipient extraction (Resent-To/Cc/Bcc first,
as Postfix), the address list scanner, and the checks on hostile
command-line addresses (L{has_control}).  Both the command-line
submission and the C{-bs} session compose messages here.

Must not touch: the pickup area (the callers write with
L{mailhub.queue.pickupfile.write_pickup}), the network.
"""

from __future__ import annotations

import email.utils
import os
import pwd
import re
import time
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from mailhub.address import AddressError, parse_mailbox
from mailhub.rfc5322 import field_name, is_field_line, missing_fields

__all__ = [
    "MAX_HEADER_SECTION", "ADDRESS_HEADERS", "RESENT_HEADERS", "Composed", "compose_message",
    "stdin_lines", "login_name", "gecos_name", "qualify", "has_control", "split_addresses",
    "qualify_header_value", "dedupe",
]

#: Header section larger than this is not parsed further (taken as body).
MAX_HEADER_SECTION = 1024 * 1024
_READ = 65536

def login_name() -> str:
    """The invoking user's login name, from the real uid (not the terminal)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid{os.getuid()}"


def gecos_name() -> str | None:
    """The invoking user's full name from the password database (GECOS), if any."""
    try:
        gecos = pwd.getpwuid(os.getuid()).pw_gecos.split(",")[0].strip()
    except KeyError:
        return None
    return gecos or None


def qualify(address: str, origin: str) -> str:
    """
    A bare user name gets C{@origin} (Postfix append_at_myorigin); the
    result is validated.

    @raise AddressError: not a valid address.
    """
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    if "@" not in address:
        address = f"{address}@{origin}"
    return str(parse_mailbox(address))


def has_control(text: str) -> bool:
    """
    Whether C{text} holds a control character (C0, DEL, C1) or a Unicode
    line or paragraph separator.  A command-line address containing one is
    refused: it could only be an attempt to make an argument look like
    several header lines (C{$'carol\\nBcc: x'} would otherwise parse as
    an RFC 5322 group and silently drop C{carol}).
    """
    return any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in text)


def _scan_addresses(value: str) -> tuple[list[tuple[str, int]], bool]:
    """
    The addresses of one RFC 5322 address list, each as C{(addr-spec text,
    end)}: the text with comments dropped, and the index in C{value} just
    after the addr-spec's last character (where C{@domain} belongs; for
    C{Name <x>} that is before the C{>}).  Groups are flattened: a group's
    display name is not an address.  The flag says whether every quote,
    comment and bracket was closed (a value that is not is not rewritten).
    """
    out: list[tuple[str, int]] = []
    cur: list[str] = []
    last = close = -1  # index after the last non-space char kept; that index before the last ">"
    quoted = escaped = at = False  # at: the current token has an "@" (not a group name then)
    angle = square = comment = 0

    def keep(i: int, c: str, literal: bool = False) -> None:
        nonlocal last, close, at
        if c == ">" and not literal:
            close = last
        at = at or c == "@"
        cur.append(c)
        if not c.isspace():
            last = i + 1

    def finish() -> None:
        token = "".join(cur).strip()
        if "<" in token and token.endswith(">"):
            token, end = token[token.rindex("<") + 1 : -1].strip(), close
        else:
            end = last
        if token:
            out.append((token, end))

    for i, c in enumerate(value):
        if escaped:
            escaped = False
            if comment == 0:
                keep(i, c, literal=True)
            continue
        if c == "\\" and (quoted or comment):
            escaped = True
            if comment == 0:
                keep(i, c, literal=True)
            continue
        if comment:
            comment += {"(": 1, ")": -1}.get(c, 0)
            continue
        if quoted:
            quoted = c != '"'
            keep(i, c, literal=True)
            continue
        if c == "(":
            comment = 1
        elif c == '"':
            quoted = True
            keep(i, c)
        elif c in "<>":
            angle += 1 if c == "<" else -1
            keep(i, c)
        elif c in "[]":
            square += 1 if c == "[" else -1
            keep(i, c)
        elif c in ",;" and not angle and not square:
            finish()
            cur, at = [], False
        elif c == ":" and not angle and not square and not at:
            cur = []  # a group's display name
        else:
            keep(i, c)
    finish()
    return out, not (quoted or escaped or comment or angle or square)


def split_addresses(values: Iterable[str]) -> list[str]:
    """
    Addresses out of RFC 5322 address lists (C{"A <a@x>, "Doe, J" <j@y>, b@z"},
    groups flattened, comments dropped).  Hand-written rather than
    C{email.utils.getaddresses}, which silently repairs bad input
    (C{"a@exa mple.org"} becomes C{a@example.org}): a malformed address
    must reach the validator as written and be refused.
    """
    return [address for value in values for address, _ in _scan_addresses(value)[0]]


_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")


def qualify_header_value(value: str, origin: str) -> str:
    """
    Append C{@origin} to the bare local names in an address header value
    (C{To: alice, Bob <bob>} -> C{To: alice@ORIGIN, Bob <bob@ORIGIN>}), as
    Postfix's cleanup does for locally submitted mail (append_at_myorigin
    on header addresses).  Only an insertion is made: display names,
    comments, encoded words, folding and already qualified addresses stay
    byte for byte.  An address is touched only when C{local@origin} is a
    valid mailbox and it is not an encoded word; anything odd is left as it
    is (with C{-t}, the recipient check refuses it later).
    """
    inserts = []
    addresses, complete = _scan_addresses(value)
    if not complete:
        return value
    for address, end in addresses:
        if end < 0 or "@" in _QUOTED.sub("", address) or _ENCODED_WORD.search(address):
            continue
        try:
            parse_mailbox(f"{address}@{origin}")
        except AddressError:
            continue
        inserts.append(end)
    for end in sorted(inserts, reverse=True):
        value = f"{value[:end]}@{origin}{value[end:]}"
    return value


def dedupe(addresses: Iterable[str]) -> list[str]:
    """C{addresses} without repeats (compared as mailboxes), in their first order."""
    seen: set[str] = set()
    out = []
    for a in addresses:
        key = parse_mailbox(a).key()
        if key not in seen:
            seen.add(key)
            out.append(a)
    return out


# -- the message ----------------------------------------------------------------------------

#: Address headers whose bare local names get @origin (Postfix cleanup's
#: sender and recipient header classes, header_opts.c; Return-Path aside).
ADDRESS_HEADERS = frozenset({
    b"from", b"sender", b"reply-to", b"errors-to", b"return-receipt-to", b"disposition-notification-to",
    b"mail-followup-to", b"to", b"cc", b"bcc",
    b"resent-from", b"resent-sender", b"resent-reply-to", b"resent-to", b"resent-cc", b"resent-bcc",
})
#: Any of these makes the message a resent one (Postfix HDR_OPT_RR).
RESENT_HEADERS = frozenset({
    b"resent-bcc", b"resent-cc", b"resent-date", b"resent-from", b"resent-message-id",
    b"resent-reply-to", b"resent-sender", b"resent-to",
})
_RECIPIENT_HEADERS = (b"to", b"cc", b"bcc")
_RESENT_RECIPIENT_HEADERS = (b"resent-to", b"resent-cc", b"resent-bcc")
#: Never passed on (blind copies).
_DROPPED_HEADERS = (b"bcc", b"resent-bcc")


def stdin_lines(stream: BinaryIO, dots: bool) -> Iterator[bytes]:
    """Lines of C{stream}; with C{dots}, a line holding only "." ends the input."""
    at_start = True
    while True:
        line = stream.readline(_READ)
        if not line:
            return
        if dots and at_start and line.rstrip(b"\r\n") == b".":
            return
        at_start = line.endswith(b"\n")
        yield line


@dataclass
class Composed:
    """A message ready for the pickup area."""

    header_recipients: list[str]  # To/Cc/Bcc, or Resent-To/Cc/Bcc when present (for -t)
    chunks: Iterator[bytes]  # the message bytes, fixed-up header first


def compose_message(
    lines: Iterator[bytes],
    sender: str,
    fullname: str | None,
    hostname: str,
    origin: str,
    now: float | None = None,
) -> Composed:
    """
    Read the header section from C{lines} (bounded), remove Bcc and
    Resent-Bcc, qualify bare names in address headers with C{@origin}, and
    add From, Date and Message-ID when missing -- or, in a resent message
    (any Resent- header), Resent-From, Resent-Date and Resent-Message-ID --
    as Postfix's cleanup does for local submissions.  The recipients for
    C{-t} come from To/Cc/Bcc, or from Resent-To/Cc/Bcc when one of those is
    present (Postfix sendmail).  The body is not read here: it streams
    through C{chunks}.
    """
    fields: list[tuple[bytes, list[bytes]]] = []
    size = 0
    first = True
    body_start: list[bytes] = []
    for line in lines:
        if first and line.startswith(b"From "):
            first = False  # an mbox separator, not a header
            continue
        first = False
        size += len(line)
        if line in (b"\n", b"\r\n"):
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1].append(line)
        elif is_field_line(line) and size <= MAX_HEADER_SECTION:
            fields.append((field_name(line), [line]))
        else:
            body_start.append(line)  # not a header: the body starts here
            break
    names = {name for name, _ in fields}
    wanted = _RESENT_RECIPIENT_HEADERS if names.intersection(_RESENT_RECIPIENT_HEADERS) else _RECIPIENT_HEADERS
    recipients: list[str] = []
    for name, raw in fields:
        if name in wanted:
            value = b"".join(raw).split(b":", 1)[1].decode("utf-8", "replace")
            recipients.extend(split_addresses([" ".join(value.split())]))
    kept = [_qualify_field(name, raw, origin) for name, raw in fields if name not in _DROPPED_HEADERS]
    resent = "Resent-" if names & RESENT_HEADERS else ""
    added = []
    if resent.lower().encode() + b"from" not in names:
        if sender:
            added.append(f"{resent}From: {email.utils.formataddr((fullname or '', sender))}\n")
        else:
            added.append(f"{resent}From: MAILER-DAEMON@{origin}\n")
    when = time.time() if now is None else now
    added.extend(f + "\n" for f in missing_fields(names, hostname, when, prefix=resent, localtime=True))
    head = b"".join(kept) + "".join(added).encode("utf-8")

    def chunks() -> Iterator[bytes]:
        yield head
        yield b"\n"
        yield from body_start
        yield from lines

    return Composed(recipients, chunks())


def _qualify_field(name: bytes, raw: list[bytes], origin: str) -> bytes:
    """One header field as bytes, its bare address names qualified when it is an address header."""
    field = b"".join(raw)
    if name not in ADDRESS_HEADERS:
        return field
    head, value = field.split(b":", 1)
    text = value.decode("utf-8", "surrogateescape")
    qualified = qualify_header_value(text, origin)
    if qualified == text:
        return field
    return head + b":" + qualified.encode("utf-8", "surrogateescape")
