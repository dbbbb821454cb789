"""
The ESMTP server: mailhub's own protocol and factory (not twisted.mail.smtp).

Owns: the SMTP conversation with a client (RFC 5321) and its extensions
PIPELINING (RFC 2920), SIZE (RFC 1870), 8BITMIME (RFC 6152),
ENHANCEDSTATUSCODES (RFC 2034/3463), SMTPUTF8 (RFC 6531), CHUNKING
(RFC 3030) and DSN parameters (RFC 3461); the limits (line length, message
size, recipients, idle timeout, connections, errors); turning DATA/BDAT
bytes into the spool file with a trace header; building the L{Envelope}
and answering 250 only after L{SpoolWriter.commit} returned.

Must not touch: the relay decision and recipient lookups (L{policy}), the
spool's files (only through L{SpoolWriter}), delivery (the C{enqueue}
callable), the global reactor (time comes from the injected clock).

How bytes are read: everything received goes into one buffer.  In command
mode complete lines are cut out of it; in DATA mode each received buffer is
handed whole to L{DotDecoder}, which finds the end marker, removes dot
stuffing with bytes operations and reports bare CR/LF; in BDAT mode exact
byte counts are taken.  Nothing is ever executed from inside message data.
Command lines may end in CRLF or a bare LF (as Postfix accepts); they are
at most 512 octets and may not contain control characters or invalid UTF-8.
While a commit is in progress (C{factory.run}, e.g. C{deferToThread}) no
command is read, and the transport is paused once 64 KiB are waiting.

Anti-smuggling (CVE-2023-51764 family): a message ends only at
C{CRLF . CRLF}.  Data containing a bare CR or bare LF is read up to that
real end, discarded, and answered C{550 5.6.0}.

Replies: every reply after the greeting carries an RFC 3463 enhanced code,
except the replies to HELO/EHLO (RFC 2034 section 3 excludes them) and the
intermediate C{354} (RFC 3463 defines no class 3).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from . import address
from .envelope import Envelope, Recipient
from .maillog import mail_event
from .policy import Policy, Reply, Session
from .spool import Spool, SpoolWriter

__all__ = [
    "SMTPServerFactory",
    "SMTPServer",
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
]

log = Logger()

#: RFC 5321 4.5.3.1.4: a command line is at most 512 octets including CRLF.
MAX_LINE = 512
#: Input kept while a commit is in progress before the transport is paused.
MAX_PENDING_INPUT = 65536
END_MARKER = b"\r\n.\r\n"
#: Control characters never allowed in a command line (TAB is tolerated).
_BAD_COMMAND_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(r"[0-9]{1,20}\Z")
_NOTIFY = {"SUCCESS", "FAILURE", "DELAY"}

# Canned replies.
OK = Reply(250, "2.0.0", "Ok")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
NO_RECIPIENTS = Reply(554, "5.5.1", "Error: no valid recipients")
TOO_BIG = Reply(552, "5.3.4", "Error: message size exceeds fixed limit")
BARE_LINE_ENDING = Reply(550, "5.6.0", "Message contains bare CR or LF; lines must end with CRLF")
LOCAL_ERROR = Reply(451, "4.3.0", "Error: queue file write error")


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
    path, rest = arg[: i + 1], arg[i + 1 :]
    if rest and not rest.startswith(" "):
        raise CommandError(501, "5.5.4", "Error: bad parameter syntax")
    return path, rest.split()


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


def received_header(
    helo: str, ip: str, hostname: str, proto: str, queue_id: str, rcpt: str | None, when: float
) -> bytes:
    """
    The trace header written before the message (RFC 5321 4.4).  C{rcpt}
    is given only when the message has exactly one recipient.
    """
    date = format_datetime(datetime.fromtimestamp(when, timezone.utc))
    head = f"Received: from {helo} ([{ip}])\r\n\tby {hostname} (mailhub) with {proto} id {queue_id}"
    tail = f"\r\n\tfor <{rcpt}>; {date}\r\n" if rcpt is not None else f"; {date}\r\n"
    return (head + tail).encode("utf-8")


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
        end = work.find(END_MARKER)
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
        body = body.replace(b"\r\n.", b"\r\n")
        if self._skip:
            cut = min(self._skip, len(body))
            body, self._skip = body[cut:], self._skip - cut
        return body, rest


# -- the protocol --------------------------------------------------------------------------

COMMAND, DATA, BDAT, DISCARD = "command", "data", "bdat", "discard"
NOT_IMPLEMENTED = {"STARTTLS", "AUTH", "ETRN", "TURN", "ATRN", "SEND", "SOML", "SAML"}


@dataclass
class Transaction:
    """One mail transaction: from MAIL to the end of DATA / BDAT LAST, or RSET."""

    sender: str
    esmtp: dict[str, Any]
    recipients: dict[str, Recipient] = field(default_factory=dict)
    accepted: list[str] = field(default_factory=list)  # RCPT TO addresses accepted, as given
    writer: SpoolWriter | None = None
    decoder: DotDecoder | None = None
    size: int = 0
    error: Reply | None = None  # first problem found while reading the message
    bdat: bool = False

    @property
    def smtputf8(self) -> bool:
        return bool(self.esmtp.get("smtputf8"))


class SMTPServer(protocol.Protocol):
    """One SMTP session.  See the module docstring for how bytes are read."""

    factory: "SMTPServerFactory"

    def __init__(self, factory: "SMTPServerFactory") -> None:
        self.factory = factory
        self.config = factory.config
        self.session = Session(client_ip="", listener=factory.listener)
        self._buf = b""
        self._mode = COMMAND
        self._esmtp = False
        self._tx: Transaction | None = None
        self._bdat_left = 0
        self._bdat_last = False
        self._bdat_error: Reply | None = None
        self._errors = 0
        self._closed = False
        self._busy = False
        self._processing = False
        self._paused = False
        self._counted = False
        self._timer: IDelayedCall | None = None
        self._handlers: dict[str, Callable[[str], None]] = {
            "HELO": self.do_helo,
            "EHLO": self.do_ehlo,
            "MAIL": self.do_mail,
            "RCPT": self.do_rcpt,
            "DATA": self.do_data,
            "BDAT": self.do_bdat,
            "RSET": self.do_rset,
            "NOOP": self.do_noop,
            "QUIT": self.do_quit,
            "HELP": self.do_help,
            "VRFY": self.do_vrfy,
            "EXPN": self.do_expn,
        }

    # -- connection ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.session.client_ip = getattr(self.transport.getPeer(), "host", "")
        if not self.factory.admit(self.session.client_ip):
            self._write(421, "4.7.0", "Too many connections")
            self._close()
            return
        self._counted = True
        self._timer = self.factory.clock.callLater(self.config.timeout, self._timed_out)
        self._write(220, "", f"{self.config.hostname} ESMTP mailhub")

    def connectionLost(self, reason: Any = None) -> None:
        self._closed = True
        self._cancel_timer()
        self._reset_transaction()
        if self._counted:
            self._counted = False
            self.factory.release(self.session.client_ip)

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.config.timeout)
        self._buf += data
        if self._busy:
            if len(self._buf) > MAX_PENDING_INPUT and not self._paused:
                self._paused = True
                self.transport.pauseProducing()
            return
        self._process()

    def _timed_out(self) -> None:
        self._timer = None
        if self._closed:
            return
        self._reset_transaction()
        self._write(421, "4.4.2", f"{self.config.hostname} Error: timeout exceeded")
        self._close()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _close(self) -> None:
        self._closed = True
        self._cancel_timer()
        self.transport.loseConnection()

    # -- replies -------------------------------------------------------------------------------

    def _write(self, code: int, enhanced: str, text: str | list[str]) -> None:
        self.transport.write(format_reply(code, enhanced, text))

    def reply(self, reply: Reply) -> None:
        """Send C{reply}; count errors and close after too many (hard error limit)."""
        if self._closed:
            return
        self._write(reply.code, reply.enhanced, reply.text)
        if reply.code >= 400 and reply.code != 421:
            self._errors += 1
            if self.config.max_errors and self._errors >= self.config.max_errors:
                self._reset_transaction()
                self._write(421, "4.7.0", "Too many errors")
                self._close()

    # -- input loop ------------------------------------------------------------------------------

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            while not self._closed and not self._busy and self._buf:
                if self._mode == DATA:
                    data, self._buf = self._buf, b""
                    self._data_chunk(data)
                elif self._mode == BDAT:
                    take, self._buf = self._buf[: self._bdat_left], self._buf[self._bdat_left :]
                    self._bdat_chunk(take)
                elif self._mode == DISCARD:
                    i = self._buf.find(b"\n")
                    self._buf = self._buf[i + 1 :] if i >= 0 else b""
                    if i >= 0:
                        self._mode = COMMAND
                else:
                    i = self._buf.find(b"\n", 0, MAX_LINE)
                    if i < 0:
                        if len(self._buf) < MAX_LINE:
                            break
                        self._mode = DISCARD
                        self.reply(Reply(500, "5.5.2", "Error: line too long"))
                        continue
                    line, self._buf = self._buf[:i], self._buf[i + 1 :]
                    self._command(line[:-1] if line.endswith(b"\r") else line)
        finally:
            self._processing = False
        if self._paused and not self._busy and not self._closed:
            self._paused = False
            self.transport.resumeProducing()

    def _command(self, raw: bytes) -> None:
        if _BAD_COMMAND_BYTES.search(raw):
            self.reply(Reply(500, "5.5.2", "Error: bad characters in command"))
            return
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.reply(Reply(500, "5.5.2", "Error: command is not valid UTF-8"))
            return
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        handler = self._handlers.get(verb)
        if handler is None:
            if verb in NOT_IMPLEMENTED:
                self.reply(Reply(502, "5.5.1", f"Error: {verb} not implemented"))
            else:
                self.reply(Reply(500, "5.5.2", "Error: command not recognized"))
            return
        try:
            handler(arg.strip(" \t"))
        except CommandError as e:
            self.reply(e.reply)

    # -- session state ------------------------------------------------------------------------------

    def _reset_transaction(self) -> None:
        """Forget the mail transaction (RSET, EHLO, errors, disconnect)."""
        tx, self._tx = self._tx, None
        if tx is not None and tx.writer is not None:
            tx.writer.abort()

    def reset_session(self) -> None:
        """
        Forget everything the client told us: the transaction and HELO.
        The one place to call after STARTTLS / AUTH changes who the client is.
        """
        self._reset_transaction()
        self._esmtp = False
        self.session.helo = None

    # -- commands --------------------------------------------------------------------------------------

    def _greet(self, arg: str, esmtp: bool) -> None:
        verb = "EHLO" if esmtp else "HELO"
        if not arg or " " in arg or not arg.isascii():
            raise CommandError(501, "5.5.4", f"Syntax: {verb} hostname")
        self._reset_transaction()
        self.session.helo = arg
        self._esmtp = esmtp

    def do_helo(self, arg: str) -> None:
        self._greet(arg, False)
        self.reply(Reply(250, "", self.config.hostname))

    def do_ehlo(self, arg: str) -> None:
        self._greet(arg, True)
        size = self.config.max_message_size
        lines = [
            self.config.hostname,
            "PIPELINING",
            f"SIZE {size}" if size else "SIZE",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "CHUNKING",
            "DSN",
        ]
        self._write(250, "", lines)

    def _address_error(self, e: address.AddressError, what: str) -> Reply:
        code = 553 if e.enhanced == "5.6.7" else 501
        return Reply(code, e.enhanced, f"Error: bad {what} address: {e}")

    def do_mail(self, arg: str) -> None:
        if self.session.helo is None:
            raise CommandError(*_fields(NEED_HELO))
        if self._tx is not None:
            raise CommandError(503, "5.5.1", "Error: nested MAIL command")
        if arg[:5].upper() != "FROM:":
            raise CommandError(501, "5.5.4", "Syntax: MAIL FROM:<address>")
        path, words = split_path(arg[5:])
        esmtp = parse_mail_params(parse_params(words), self.config.max_message_size)
        try:
            sender = address.parse_path(path, allow_utf8=esmtp["smtputf8"])
        except address.AddressError as e:
            self.reply(self._address_error(e, "sender"))
            return
        self._tx = Transaction(sender="" if sender is None else str(sender), esmtp=esmtp)
        self.reply(Reply(250, "2.1.0", "Ok"))

    def do_rcpt(self, arg: str) -> None:
        tx = self._tx
        if tx is None:
            raise CommandError(*_fields(NEED_MAIL))
        if tx.bdat:
            raise CommandError(503, "5.5.1", "Error: RCPT not allowed during BDAT")
        if arg[:3].upper() != "TO:":
            raise CommandError(501, "5.5.4", "Syntax: RCPT TO:<address>")
        path, words = split_path(arg[3:])
        notify, orcpt = parse_rcpt_params(parse_params(words))
        if path.removeprefix("<").removesuffix(">").lower() == "postmaster":
            mailbox = self.factory.policy.postmaster()
        else:
            try:
                parsed = address.parse_path(path, allow_utf8=tx.smtputf8)
            except address.AddressError as e:
                self.reply(self._address_error(e, "recipient"))
                return
            if parsed is None:
                raise CommandError(501, "5.1.3", "Error: null recipient address")
            mailbox = parsed
        if len(tx.accepted) >= self.config.max_recipients:
            raise CommandError(452, "4.5.3", "Error: too many recipients")
        result, addresses = self.factory.policy.check_recipient(self.session, mailbox)
        if result.ok:
            tx.accepted.append(str(mailbox))
            for a in addresses:
                if a not in tx.recipients:
                    tx.recipients[a] = Recipient(address=a, original=str(mailbox), notify=list(notify), orcpt=orcpt)
        else:
            mail_event(
                "reject",
                "NOQUEUE: reject: RCPT from [{client}]: {code} {enhanced} {text}; from=<{sender}> to=<{rcpt}>",
                client=self.session.client_ip, code=result.code, enhanced=result.enhanced,
                text=result.text, sender=tx.sender, rcpt=str(mailbox),
            )
        self.reply(result)

    def _open_message(self, tx: Transaction) -> Reply | None:
        """Create the spool file and write the Received header; a 451 reply on trouble."""
        try:
            tx.writer = self.factory.spool.new_message()
            one = tx.accepted[0] if len(tx.accepted) == 1 else None
            tx.writer.write(
                received_header(
                    self.session.helo or "", self.session.client_ip, self.config.hostname,
                    self._protocol_name(tx), tx.writer.queue_id, one, self.factory.clock.seconds(),
                )
            )
        except Exception:
            log.failure("cannot create a queue file")
            self._reset_transaction()
            return LOCAL_ERROR
        return None

    def _protocol_name(self, tx: Transaction) -> str:
        return with_protocol(self._esmtp, self.session.tls, bool(self.session.authenticated_user), tx.smtputf8)

    def do_data(self, arg: str) -> None:
        if arg:
            raise CommandError(501, "5.5.4", "Syntax: DATA")
        tx = self._tx
        if tx is None:
            raise CommandError(*_fields(NEED_RCPT))
        if tx.bdat:
            raise CommandError(503, "5.5.1", "Error: DATA not allowed after BDAT")
        if not tx.recipients:
            raise CommandError(*_fields(NO_RECIPIENTS))
        trouble = self._open_message(tx)
        if trouble is not None:
            self.reply(trouble)
            return
        tx.decoder = DotDecoder()
        self._mode = DATA
        self._write(354, "", "End data with <CR><LF>.<CR><LF>")

    def do_bdat(self, arg: str) -> None:
        words = arg.split()
        if not 1 <= len(words) <= 2 or not _DIGITS.match(words[0]) or (len(words) == 2 and words[1].upper() != "LAST"):
            raise CommandError(501, "5.5.4", "Syntax: BDAT count [LAST]")
        self._bdat_left = int(words[0])
        self._bdat_last = len(words) == 2
        self._bdat_error = None
        tx = self._tx
        if tx is None:
            self._bdat_error = NEED_MAIL
        elif not tx.recipients:
            self._bdat_error = NEED_RCPT
        elif not tx.bdat:
            self._bdat_error = self._open_message(tx)
            if self._bdat_error is None:
                tx.bdat = True
        self._mode = BDAT
        if self._bdat_left == 0:
            self._bdat_chunk(b"")

    def do_rset(self, arg: str) -> None:
        if arg:
            raise CommandError(501, "5.5.4", "Syntax: RSET")
        self._reset_transaction()
        self.reply(OK)

    def do_noop(self, arg: str) -> None:
        self.reply(OK)

    def do_quit(self, arg: str) -> None:
        self._reset_transaction()
        self._write(221, "2.0.0", "Bye")
        self._close()

    def do_help(self, arg: str) -> None:
        self._write(214, "2.0.0", ["Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP VRFY", "See RFC 5321"])

    def do_vrfy(self, arg: str) -> None:
        if not self.config.vrfy:
            raise CommandError(502, "5.5.1", "Error: VRFY command is disabled")
        if not arg:
            raise CommandError(501, "5.5.4", "Syntax: VRFY address")
        # Never reveal whether a user exists (RFC 5321 3.5.3).
        self.reply(Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery"))

    def do_expn(self, arg: str) -> None:
        if not self.config.expn:
            raise CommandError(502, "5.5.1", "Error: EXPN command is disabled")
        if not arg:
            raise CommandError(501, "5.5.4", "Syntax: EXPN list")
        self.reply(Reply(252, "2.5.0", "Cannot EXPN list, but will accept message and attempt delivery"))

    # -- message content ------------------------------------------------------------------------------

    def _take(self, tx: Transaction, body: bytes) -> None:
        """Account C{body} to the message and write it unless it is already doomed."""
        tx.size += len(body)
        if tx.error is not None or not body:
            return
        limit = self.config.max_message_size
        if limit and tx.size > limit:
            self._fail(tx, TOO_BIG)
            return
        try:
            assert tx.writer is not None
            tx.writer.write(body)
        except Exception:
            log.failure("queue file write error")
            self._fail(tx, LOCAL_ERROR)

    def _fail(self, tx: Transaction, why: Reply) -> None:
        """Remember the first problem and stop writing; the reply waits for the end of the data."""
        tx.error = why
        if tx.writer is not None:
            tx.writer.abort()

    def _data_chunk(self, data: bytes) -> None:
        tx = self._tx
        assert tx is not None and tx.decoder is not None
        body, rest = tx.decoder.feed(data)
        if tx.decoder.bare_line_ending and tx.error is None:
            self._fail(tx, BARE_LINE_ENDING)
        self._take(tx, body)
        if rest is not None:
            self._buf = rest + self._buf
            self._mode = COMMAND
            self._end_of_message(tx)

    def _bdat_chunk(self, data: bytes) -> None:
        self._bdat_left -= len(data)
        tx = self._tx
        if self._bdat_error is None and tx is not None:
            self._take(tx, data)
        if self._bdat_left:
            return
        self._mode = COMMAND
        if self._bdat_error is not None:
            self.reply(self._bdat_error)
        elif tx is not None and tx.error is not None:
            self._end_of_message(tx)
        elif tx is not None and self._bdat_last:
            self._end_of_message(tx)
        elif tx is not None:
            self.reply(Reply(250, "2.0.0", f"Ok: {tx.size} octets received"))

    def _end_of_message(self, tx: Transaction) -> None:
        """The message is complete: reject it, or commit it and answer 250 only once it is durable."""
        self._tx = None
        if tx.error is not None:
            if tx.writer is not None:
                tx.writer.abort()
            self.reply(tx.error)
            return
        writer = tx.writer
        assert writer is not None
        envelope = Envelope(
            queue_id=writer.queue_id,
            sender=tx.sender,
            recipients=list(tx.recipients.values()),
            arrival=self.factory.clock.seconds(),
            esmtp={k: v for k, v in tx.esmtp.items() if k != "declared_size"} | {"size": writer.size},
            client={
                "helo": self.session.helo,
                "addr": self.session.client_ip,
                "protocol": self._protocol_name(tx),
                "user": self.session.authenticated_user or "",
                "listener": self.session.listener,
            },
        )
        self._busy = True
        d = defer.maybeDeferred(self.factory.run, writer.commit, envelope)
        d.addCallbacks(self._committed, self._commit_failed, callbackArgs=(envelope,), errbackArgs=(envelope,))

    def _committed(self, _: object, envelope: Envelope) -> None:
        self._busy = False
        try:
            self.factory.enqueue(envelope)
        except Exception:
            # Committed means queued: the scheduler finds it again at start.
            log.failure("enqueue failed for {queue_id}", queue_id=envelope.queue_id)
        mail_event(
            "accepted",
            "{queue_id}: accepted from=<{sender}> nrcpt={nrcpt} size={size} client=[{client}] proto={proto}",
            queue_id=envelope.queue_id, sender=envelope.sender, nrcpt=len(envelope.recipients),
            size=envelope.esmtp["size"], client=envelope.client["addr"], proto=envelope.client["protocol"],
            **{"from": envelope.sender},
        )
        self._errors = 0  # Postfix: the hard limit counts errors "without delivering mail"
        self.reply(Reply(250, "2.0.0", f"Ok: queued as {envelope.queue_id}"))
        self._process()

    def _commit_failed(self, failure: Any, envelope: Envelope) -> None:
        self._busy = False
        log.failure("commit failed for {queue_id}", failure, queue_id=envelope.queue_id)
        self.reply(LOCAL_ERROR)
        self._process()


def _fields(reply: Reply) -> tuple[int, str, str]:
    return reply.code, reply.enhanced, reply.text


def _call(f: Callable[..., Any], *args: Any) -> Any:
    return f(*args)


class SMTPServerFactory(protocol.Factory):
    """
    Builds L{SMTPServer}s for one listener and counts their connections.

    @param enqueue: called with each committed envelope (the scheduler).
    @param listener: C{"smtp"}, C{"submission"} or C{"smtps"}.
    @param run: how to call the blocking C{SpoolWriter.commit} (fsyncs):
        default in the reactor thread; pass C{twisted.internet.threads.deferToThread}
        to keep the reactor responsive.  The session reads no commands until
        the commit is done.
    """

    protocol = SMTPServer  # type: ignore[assignment]

    def __init__(
        self,
        config: Any,
        spool: Spool,
        enqueue: Callable[[Envelope], None],
        policy: Policy,
        clock: IReactorTime,
        listener: str = "smtp",
        run: Callable[..., Any] = _call,
    ) -> None:
        self.config = config
        self.spool = spool
        self.enqueue = enqueue
        self.policy = policy
        self.clock = clock
        self.listener = listener
        self.run = run
        self.connections = 0
        self.per_ip: dict[str, int] = {}

    def buildProtocol(self, addr: Any) -> SMTPServer:
        return SMTPServer(self)

    def admit(self, ip: str) -> bool:
        """Count a new connection from C{ip}; False if a limit is reached."""
        if self.connections >= self.config.max_connections:
            return False
        if self.per_ip.get(ip, 0) >= self.config.max_connections_per_ip:
            return False
        self.connections += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return True

    def release(self, ip: str) -> None:
        self.connections -= 1
        left = self.per_ip.get(ip, 0) - 1
        if left > 0:
            self.per_ip[ip] = left
        else:
            self.per_ip.pop(ip, None)
