"""
mailhub-sendmail: the sendmail(1)-compatible submission command.

Owns: the command line of /usr/sbin/sendmail (also as C{mailq} and
C{newaliases} by the name it is called with), header fix-ups of local
submissions (Date, Message-ID, From -- or their Resent- forms -- added when
missing; Bcc and Resent-Bcc removed; bare names in address headers
qualified with the origin domain), C{-t} recipient extraction (Resent-To/
Cc/Bcc first, as Postfix), and the C{-bs} SMTP dialogue on stdin/stdout.
Hostile arguments (control characters in addresses or the full name) are
refused or sanitised; the command never ends in a traceback.
Every message goes into the pickup area (L{mailhub.queue.pickup.write_pickup});
the daemon need not be running.

Must not touch: the queue itself (only the daemon's PickupService turns a
pickup file into a queued message), the network.  Exit codes follow
sysexits.h; see docs/sendmail.rst.
"""

from __future__ import annotations

import email.utils
import os
import pwd
import re
import secrets
import sys
import time
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, TextIO

from mailhub.address import AddressError, parse_mailbox, parse_path
from mailhub.cli import silence
from mailhub.queue.pickup import MessageTooLarge, clean_fullname, write_pickup

__all__ = [
    "main", "run", "Settings", "UsageError", "parse_args", "Invocation", "compose_message",
    "split_addresses", "qualify_header_value", "has_control", "Progress",
]

PROG = "mailhub-sendmail"

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78

#: Header section larger than this is not parsed further (taken as body).
MAX_HEADER_SECTION = 1024 * 1024
_READ = 65536
_MAX_COMMAND = 2048
_MAX_RECIPIENTS = 1000


class UsageError(Exception):
    """A bad command line: exit 64 with this message."""


@dataclass
class Settings:
    """What the command needs from the configuration."""

    spool_path: str
    hostname: str
    origin: str  # myorigin: the domain added to bare user names
    max_size: int


def load_settings(config_file: str | None) -> Settings:
    """
    Read the configuration (C{-C FILE} > C{$MAILHUB_CONFIG} >
    /etc/mailhub/mailhub.toml > defaults).  The origin domain (Postfix
    C{myorigin}) is the first local domain, so a bounce to a local sender
    always comes back to a local mailbox.

    @raise mailhub.config.ConfigError: the configuration is unusable.
    """
    from mailhub.config import find_config_file, load_config

    config = load_config(find_config_file(config_file))
    return Settings(
        spool_path=config.spool.path,
        hostname=config.server.hostname,
        origin=config.local.domains[0] if config.local.domains else config.server.hostname,
        max_size=config.server.max_message_size,
    )


# -- the command line -----------------------------------------------------------------

#: Options that take a value (attached or as the next argument), as Postfix's sendmail.
_WITH_VALUE = set("ABCFLNORVXbefhopr")
#: Options without a value.  All but -I, -i, -t, -v are accepted and ignored.
_FLAGS = set("GIUcimntvx")


@dataclass
class Invocation:
    mode: str = "m"  # -b letter: m deliver, p list, s SMTP, i newaliases; q flush
    recipients: list[str] = field(default_factory=list)
    extract: bool = False  # -t
    dots: bool = True  # a lone "." ends input; -i / -oi turn this off
    sender: str | None = None  # -f / -r
    fullname: str | None = None  # -F
    config: str | None = None  # -C
    verbose: bool = False
    queue_id: str | None = None  # -qI<id>


HELP = """\
usage: mailhub-sendmail [options] [recipient ...]
       mailq | mailhub-sendmail -bp
Submit a message read from standard input to mailhub (Postfix-compatible options).
  -t           take recipients from To:, Cc:, Bcc: (and the arguments)
  -i, -oi      a line with a lone "." does not end the message
  -f SENDER    envelope sender (also -r)
  -F NAME      full name for a generated From:
  -C FILE      mailhub configuration file
  -bp          list the queue (as mailq)
  -bs          speak SMTP on standard input and output
  -q           flush the queue (-qIID: one message)
  -v           verbose
  --help       this text;  --version  the mailhub version
See mailhub-sendmail(1).
"""


def parse_args(argv: list[str], prog: str = "sendmail") -> Invocation:
    """
    Parse a sendmail command line the way Postfix's sendmail does: option
    letters can be grouped (C{-ti}), values attached or separate
    (C{-fme}, C{-f me}), the first non-option starts the recipients.

    @param prog: the name called by: C{mailq} means C{-bp}, C{newaliases} C{-bi}.
    @raise UsageError: on an unknown or incomplete option.
    """
    inv = Invocation()
    if prog == "mailq":
        inv.mode = "p"
    elif prog == "newaliases":
        inv.mode = "i"
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        j = 1
        while j < len(arg):
            c = arg[j]
            if c == "q":
                rest = arg[j + 1 :]
                inv.mode = "q"
                if rest.startswith("I") and len(rest) > 1:
                    inv.queue_id = rest[1:]
                break
            if c in _WITH_VALUE:
                value = arg[j + 1 :]
                if not value:
                    i += 1
                    if i >= len(argv):
                        raise UsageError(f"option -{c} requires a value")
                    value = argv[i]
                _option(inv, c, value)
                break
            if c not in _FLAGS:
                raise UsageError(f"unknown option -{c}")
            if c == "I":
                inv.mode = "i"
            elif c == "i":
                inv.dots = False
            elif c == "t":
                inv.extract = True
            elif c == "v":
                inv.verbose = True
            j += 1
        i += 1
    inv.recipients = argv[i:]
    return inv


def _option(inv: Invocation, c: str, value: str) -> None:
    if c in "fr":
        inv.sender = value
    elif c == "F":
        inv.fullname = value
    elif c == "C":
        inv.config = value
    elif c == "o":
        if value == "i":
            inv.dots = False
    elif c == "b":
        if value not in ("m", "p", "s", "i"):
            raise UsageError(
                f"-b{value} is not supported (use -bm to send, -bp to list the queue, -bs for SMTP on stdin)"
            )
        inv.mode = value
    # -A -B -L -N -O -R -V -X -e -h -p: accepted and ignored, as Postfix does.


# -- addresses ----------------------------------------------------------------------------


def login_name() -> str:
    """The invoking user's login name, from the real uid (not the terminal)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid{os.getuid()}"


def gecos_name() -> str | None:
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


def _dedupe(addresses: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for a in addresses:
        key = parse_mailbox(a).key()
        if key not in seen:
            seen.add(key)
            out.append(a)
    return out


# -- the message ----------------------------------------------------------------------------

_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")

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
        elif _FIELD.match(line) and size <= MAX_HEADER_SECTION:
            fields.append((line.split(b":", 1)[0].strip().lower(), [line]))
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
    if resent.lower().encode() + b"date" not in names:
        added.append(f"{resent}Date: {email.utils.formatdate(now, localtime=True)}\n")
    if resent.lower().encode() + b"message-id" not in names:
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now))
        added.append(f"{resent}Message-ID: <{stamp}.{secrets.token_hex(8)}@{hostname}>\n")
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


# -- submitting ------------------------------------------------------------------------------


def _errno_status(e: OSError) -> int:
    import errno

    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EAGAIN, errno.EIO, errno.ENOMEM):
        return EX_TEMPFAIL
    return EX_CANTCREAT


@dataclass
class Progress:
    """
    Where the current submission stands, for the last-resort error handler
    in L{run}: once a message is committed to the pickup area the command
    must report success whatever fails afterwards (the caller would
    otherwise send it again).
    """

    committed: bool = False


_CONTROL = "control character in the address"


def _submit(
    inv: Invocation, settings: Settings, stdin: BinaryIO, stderr: TextIO, progress: Progress | None = None
) -> int:
    if inv.sender is not None and has_control(inv.sender):
        stderr.write(f"{PROG}: invalid sender address {inv.sender!r}: {_CONTROL}\n")
        return EX_USAGE
    try:
        sender = "" if inv.sender in ("<>", "") else qualify(inv.sender or login_name(), settings.origin)
    except AddressError as e:
        stderr.write(f"{PROG}: invalid sender address {inv.sender!r}: {e}\n")
        return EX_USAGE
    if not inv.extract and not inv.recipients:
        stderr.write(f"{PROG}: no recipients given (use -t or list addresses)\n")
        return EX_USAGE
    for arg in inv.recipients:
        # One argument is one address or a comma-separated list, never a header.
        if has_control(arg):
            stderr.write(f"{PROG}: invalid recipient address {arg!r}: {_CONTROL}\n")
            return EX_NOUSER
    recipients = []
    for raw in split_addresses(inv.recipients) if inv.recipients else []:
        try:
            recipients.append(qualify(raw, settings.origin))
        except AddressError as e:
            stderr.write(f"{PROG}: invalid recipient address {raw!r}: {e}\n")
            return EX_NOUSER
    fullname = clean_fullname(inv.fullname if inv.fullname is not None else gecos_name())
    composed = compose_message(
        stdin_lines(stdin, inv.dots), sender, fullname, settings.hostname, settings.origin
    )
    if inv.extract:
        for raw in composed.header_recipients:
            try:
                recipients.append(qualify(raw, settings.origin))
            except AddressError as e:
                stderr.write(f"{PROG}: invalid recipient address {raw!r} in the message header: {e}\n")
                return EX_NOUSER
    if not recipients:
        stderr.write(f"{PROG}: no recipients found (no To, Cc or Bcc header and no address given)\n")
        return EX_USAGE
    try:
        name = write_pickup(
            settings.spool_path, sender, _dedupe(recipients), composed.chunks, fullname, settings.max_size
        )
    except MessageTooLarge as e:
        stderr.write(f"{PROG}: {e}\n")
        return EX_DATAERR
    except OSError as e:
        stderr.write(f"{PROG}: cannot write to the pickup directory {settings.spool_path}/pickup: {e.strerror or e}\n")
        return _errno_status(e)
    if progress is not None:
        progress.committed = True
    if inv.verbose:
        stderr.write(f"{PROG}: queued as pickup file {name} for {', '.join(_dedupe(recipients))}\n")
    return EX_OK


# -- SMTP on stdin/stdout (-bs) ----------------------------------------------------------------

_MAIL = re.compile(r"MAIL FROM:\s*(<[^>]*>|[^\s<>]+)(.*)\Z", re.I | re.S)
_RCPT = re.compile(r"RCPT TO:\s*(<[^>]*>|[^\s<>]+)(.*)\Z", re.I | re.S)


class _InputEnded(Exception):
    """The -bs input ended inside DATA."""


class StdioSMTP:
    """
    A minimal, correct SMTP server on a pair of byte streams, submitting
    into the pickup area.  Synchronous: one process per session, as with
    Postfix's C{sendmail -bs}.  No AUTH or STARTTLS: the peer is a local
    process whose identity the daemon takes from the pickup file's owner.
    """

    def __init__(
        self,
        settings: Settings,
        fullname: str | None,
        rfile: BinaryIO,
        wfile: BinaryIO,
        progress: Progress | None = None,
    ) -> None:
        self.settings = settings
        self.fullname = clean_fullname(fullname)
        self.progress = progress if progress is not None else Progress()
        self.rfile = rfile
        self.wfile = wfile
        self._reset()

    def _reset(self) -> None:
        self.sender: str | None = None
        self.recipients: list[str] = []
        self.declared_size = 0

    def reply(self, code: int, enhanced: str | None, *lines: str) -> None:
        out = []
        for n, text in enumerate(lines):
            sep = "-" if n < len(lines) - 1 else " "
            body = f"{enhanced} {text}" if enhanced else text
            out.append(f"{code}{sep}{body}\r\n")
        self.wfile.write("".join(out).encode("utf-8"))
        self.wfile.flush()

    def _readline(self) -> bytes | None:
        line = self.rfile.readline(_MAX_COMMAND + 1)
        if not line:
            return None
        if not line.endswith(b"\n") and len(line) > _MAX_COMMAND:
            while line and not line.endswith(b"\n"):
                line = self.rfile.readline(_READ)
            return b"\x00too-long"
        return line

    def serve(self) -> int:
        host = self.settings.hostname
        self.reply(220, None, f"{host} ESMTP mailhub (sendmail -bs)")
        while True:
            raw = self._readline()
            if raw is None:
                return EX_OK
            if raw == b"\x00too-long":
                self.reply(500, "5.5.2", "Error: line too long")
                continue
            try:
                line = raw.rstrip(b"\r\n").decode("utf-8")
            except UnicodeDecodeError:
                self.reply(500, "5.5.2", "Error: command is not UTF-8")
                continue
            verb = line.split(" ", 1)[0].upper()
            arg = line[len(verb) :].strip()
            if verb == "EHLO":
                if not arg:
                    self.reply(501, "5.5.4", "Syntax: EHLO hostname")
                    continue
                self._reset()
                self.reply(
                    250, None, host, "PIPELINING", f"SIZE {self.settings.max_size}", "8BITMIME",
                    "ENHANCEDSTATUSCODES", "SMTPUTF8",
                )
            elif verb == "HELO":
                if not arg:
                    self.reply(501, "5.5.4", "Syntax: HELO hostname")
                    continue
                self._reset()
                self.reply(250, None, host)
            elif verb == "MAIL":
                self._mail(line)
            elif verb == "RCPT":
                self._rcpt(line)
            elif verb == "DATA":
                if arg:
                    self.reply(501, "5.5.4", "Syntax: DATA")
                elif self.sender is None:
                    self.reply(503, "5.5.1", "Error: need MAIL command")
                elif not self.recipients:
                    self.reply(554, "5.5.1", "Error: no valid recipients")
                elif not self._data():
                    return EX_OK
            elif verb == "RSET":
                self._reset()
                self.reply(250, "2.0.0", "Ok")
            elif verb == "NOOP":
                self.reply(250, "2.0.0", "Ok")
            elif verb == "VRFY":
                self.reply(252, "2.5.0", "Cannot VRFY user, but will accept message")
            elif verb == "HELP":
                self.reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP VRFY QUIT")
            elif verb == "QUIT":
                self.reply(221, "2.0.0", "Bye")
                return EX_OK
            else:
                self.reply(500, "5.5.2", "Error: command not recognized")

    def _mail(self, line: str) -> None:
        if self.sender is not None:
            self.reply(503, "5.5.1", "Error: nested MAIL command")
            return
        m = _MAIL.match(line)
        if not m:
            self.reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
            return
        size = 0
        for param in m.group(2).split():
            key, _, value = param.partition("=")
            key = key.upper()
            if key == "SIZE" and value.isdigit():
                size = int(value)
            elif key == "BODY" and value.upper() in ("7BIT", "8BITMIME"):
                pass
            elif key == "SMTPUTF8" and not value:
                pass
            else:
                self.reply(555, "5.5.4", f"Unsupported option: {param}")
                return
        if size > self.settings.max_size:
            self.reply(552, "5.3.4", "Message size exceeds fixed limit")
            return
        path = m.group(1)
        if has_control(path):
            self.reply(501, "5.1.7", f"Bad sender address syntax: {_CONTROL}")
            return
        try:
            if path.strip("<>") == "":
                sender = ""
            else:
                sender = qualify(path, self.settings.origin)
        except AddressError as e:
            self.reply(501, "5.1.7", f"Bad sender address syntax: {e}")
            return
        self.sender = sender
        self.progress.committed = False  # a new transaction: nothing of it is queued yet
        self.declared_size = size
        self.reply(250, "2.1.0", "Ok")

    def _rcpt(self, line: str) -> None:
        if self.sender is None:
            self.reply(503, "5.5.1", "Error: need MAIL command")
            return
        m = _RCPT.match(line)
        if not m:
            self.reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
            return
        if m.group(2).strip():
            self.reply(555, "5.5.4", f"Unsupported option: {m.group(2).strip()}")
            return
        if len(self.recipients) >= _MAX_RECIPIENTS:
            self.reply(452, "4.5.3", "Error: too many recipients")
            return
        path = m.group(1)
        if has_control(path):
            self.reply(501, "5.1.3", f"Bad recipient address syntax: {_CONTROL}")
            return
        try:
            if path.strip("<>") == "":
                raise AddressError("empty recipient", "5.1.3")
            bare = path.strip("<>")
            recipient = qualify(bare, self.settings.origin) if "@" not in bare else str(parse_path(path))
        except AddressError as e:
            self.reply(501, "5.1.3", f"Bad recipient address syntax: {e}")
            return
        self.recipients.append(recipient)
        self.reply(250, "2.1.5", "Ok")

    def _data_lines(self, state: dict[str, bool]) -> Iterator[bytes]:
        at_start = True
        while True:
            line = self.rfile.readline(_READ)
            if not line:
                state["eof"] = True
                # Raising (not returning) makes write_pickup remove the partial
                # file: a message cut off before its "." is never queued.
                raise _InputEnded()
            if at_start and line in (b".\r\n", b".\n"):
                state["ended"] = True
                return
            if at_start and line.startswith(b"."):
                line = line[1:]
            at_start = line.endswith(b"\n")
            yield line

    def _data(self) -> bool:
        """Receive one message; C{False} when the input ended inside DATA (nothing is queued)."""
        self.reply(354, None, "End data with <CR><LF>.<CR><LF>")
        state = {"eof": False, "ended": False}
        source = self._data_lines(state)
        reply: tuple[int, str, str]
        try:
            composed = compose_message(
                source, self.sender or "", self.fullname, self.settings.hostname, self.settings.origin
            )
            name = write_pickup(
                self.settings.spool_path, self.sender or "", _dedupe(self.recipients),
                composed.chunks, self.fullname, self.settings.max_size,
            )
            self.progress.committed = True
            reply = (250, "2.0.0", f"Ok: queued as {name}")
        except MessageTooLarge:
            reply = (552, "5.3.4", "Error: message too large")
        except OSError as e:
            reply = (451, "4.3.0", f"Error: cannot write to the pickup directory: {e.strerror or e}")
        except _InputEnded:
            return False
        try:
            for _ in source:  # drain what the writer did not read
                pass
        except _InputEnded:
            return False
        self._reset()
        self.reply(*reply)
        return True


# -- entry point ------------------------------------------------------------------------------------


def _queue_command(args: list[str], settings: Settings, stdout: TextIO) -> int:
    from mailhub.cli.queue import QueueOptions, run_queue

    options = QueueOptions()
    options.parseOptions(args)
    return run_queue(options, settings.spool_path, out=stdout)


def _say(stderr: TextIO, line: str) -> None:
    """
    Write one line to stderr, never raising: when stderr is gone (a closed
    pipe) it is pointed at /dev/null so that the interpreter's final flush
    cannot fail and change the exit status.
    """
    try:
        stderr.write(line)
        stderr.flush()
    except (OSError, ValueError, AttributeError):
        silence(stderr)


def run(
    argv: list[str],
    stdin: BinaryIO,
    stdout: BinaryIO,
    stderr: TextIO,
    prog: str = "sendmail",
) -> int:
    """
    Run the command; return the exit status (sysexits.h).  Never raises
    (except SystemExit): an unexpected error is one line on stderr and
    EX_TEMPFAIL, so callers retry -- unless the message was already
    committed to the pickup area, then it is EX_OK (a retry would send it
    twice).
    """
    progress = Progress()
    try:
        return _run(argv, stdin, stdout, stderr, prog, progress)
    except (Exception, KeyboardInterrupt) as e:
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
        what = " ".join(what.split())
        if progress.committed:
            _say(stderr, f"{PROG}: warning: {what} (the message was queued)\n")
            return EX_OK
        _say(stderr, f"{PROG}: internal error, message not sent, try again later: {what}\n")
        return EX_TEMPFAIL


def _run(
    argv: list[str],
    stdin: BinaryIO,
    stdout: BinaryIO,
    stderr: TextIO,
    prog: str,
    progress: Progress,
) -> int:
    if argv and argv[0] in ("--help", "-h"):
        stdout.write(HELP.encode("utf-8"))
        stdout.flush()
        return EX_OK
    if argv and argv[0] == "--version":
        from mailhub import __version__

        stdout.write(f"mailhub-sendmail (mailhub {__version__})\n".encode("utf-8"))
        stdout.flush()
        return EX_OK
    try:
        inv = parse_args(argv, prog)
    except UsageError as e:
        stderr.write(f"{PROG}: {e}\n")
        return EX_USAGE
    if inv.mode == "i":
        stderr.write(f"{PROG}: nothing to do: mailhub re-reads the aliases file when it changes\n")
        return EX_OK
    try:
        settings = load_settings(inv.config)
    except Exception as e:  # ConfigError, with a one-line message
        stderr.write(f"{PROG}: configuration error: {e}\n")
        return EX_CONFIG
    if inv.mode in ("p", "q"):
        import io

        text = io.TextIOWrapper(stdout, encoding="utf-8", write_through=True)
        try:
            args = ["list"] if inv.mode == "p" else ["flush"] + ([inv.queue_id] if inv.queue_id else [])
            return _queue_command(args, settings, text)
        finally:
            text.detach()
    if inv.mode == "s":
        fullname = inv.fullname if inv.fullname is not None else gecos_name()
        return StdioSMTP(settings, fullname, stdin, stdout, progress).serve()
    return _submit(inv, settings, stdin, stderr, progress)


def main(argv: list[str] | None = None) -> None:
    """Console script C{mailhub-sendmail}; also install it as sendmail, mailq, newaliases."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "sendmail"
    if argv is None:
        argv = sys.argv[1:]
    # A closed standard descriptor (cron, "2>&-") is None here; like Postfix's
    # sendmail, use /dev/null rather than fail.
    stdin = sys.stdin.buffer if sys.stdin is not None else open(os.devnull, "rb")
    stdout = sys.stdout.buffer if sys.stdout is not None else open(os.devnull, "wb")
    stderr = sys.stderr if sys.stderr is not None else open(os.devnull, "w")
    sys.exit(run(argv, stdin, stdout, stderr, prog))


if __name__ == "__main__":
    main()
