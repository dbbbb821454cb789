"""
The ESMTP server: mailhub's own protocol and factory (not twisted.mail.smtp).

Owns: the SMTP conversation with a client (RFC 5321) and its extensions
PIPELINING (RFC 2920), SIZE (RFC 1870), 8BITMIME (RFC 6152),
ENHANCEDSTATUSCODES (RFC 2034/3463), SMTPUTF8 (RFC 6531), CHUNKING
(RFC 3030), DSN parameters (RFC 3461), STARTTLS (RFC 3207) and AUTH
PLAIN/LOGIN (RFC 4954); the limits (line length, message size,
recipients, idle timeout, connections, errors); turning DATA/BDAT bytes
into the spool file with a trace header; building the L{Envelope} and
answering 250 only after L{SpoolWriter.commit} returned.  The pure pieces
(reply formatting, parameter parsing, L{DotDecoder}, the Received header)
live in L{mailhub.smtpproto}.

Must not touch: the relay decision, recipient lookups, AUTH-before-MAIL
and sender ownership rules (L{policy}), passwords and SASL decoding
(L{auth}), certificates (L{tls}), the spool's files (only through
L{SpoolWriter}), delivery (the C{enqueue} callable), the global reactor
(time comes from the injected clock).

How bytes are read: everything received goes into one buffer.  In command
mode complete lines are cut out of it by moving an offset (the buffer is
sliced once per run, so thousands of pipelined commands cost linear time);
in DATA mode each received buffer is handed whole to L{DotDecoder}, which
finds the end marker, removes dot stuffing with bytes operations and
reports bare CR/LF; in BDAT mode exact byte counts are taken.  Nothing is
ever executed from inside message data.  Command lines may end in CRLF or a
bare LF (as Postfix accepts); they are at most 512 octets, MAIL and RCPT
lines 2048 (their extension parameters, Postfix line_length_limit), AUTH
lines and SASL responses 12288 (RFC 4954 4), and may not contain control
characters or invalid UTF-8.  The header section of a message is scanned
(buffers, not lines) for C{Received:} fields: C{max_hops} of them is a
mail loop, C{554 5.4.6 Too many hops} (RFC 5321 6.3).

Flow control: nothing is executed while a commit is in progress
(C{factory.run}, e.g. C{deferToThread}), while the client does not read our
replies (the session is a streaming producer on its transport, which calls
C{pauseProducing} when its write buffer is full), or during the one-second
delay after C{soft_error_limit} errors; meanwhile the transport's reading
is paused once 64 KiB are waiting.  A client that shuts down its sending
side (half-close) still gets every reply before the server closes.

Timeouts (Postfix smtpd_per_request_deadline, smtpd_min_data_rate): a
command must be complete within C{timeout} of the previous one; bytes of an
unfinished line do not reset the timer.  In DATA / BDAT each buffer extends
the deadline by its size divided by C{min_data_rate}, at most to
C{timeout} from now.

Anti-smuggling (CVE-2023-51764 family): a message ends only at
C{CRLF . CRLF}.  Data containing a bare CR or bare LF is read up to that
real end, discarded, and answered C{550 5.6.0}.

STARTTLS (CVE-2011-0411): after C{220 2.0.0 Ready to start TLS} every
byte the client sent in clear after the STARTTLS line is discarded, then
C{transport.startTLS} is called and the session is reset (HELO, AUTH and
transaction forgotten: EHLO again).  AUTH is offered only with a users
file and over TLS (or from 127.0.0.1/::1 when allowed); a failed login is
answered only after the throttle's delay, and nothing is read meanwhile.
Passwords and SASL responses are never logged.

Replies: every reply after the greeting carries an RFC 3463 enhanced code,
except the replies to HELO/EHLO (RFC 2034 section 3 excludes them) and the
intermediate C{354} (RFC 3463 defines no class 3).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, protocol
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IPushProducer,
    IReactorTime,
    ITLSTransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import address, auth
from .envelope import Envelope, Recipient
from .maillog import mail_event
from .policy import SENDER_CHECKS, Policy, Reply, Session, is_loopback
from .smtpproto import (
    MAX_AUTH_LINE,
    MAX_LINE,
    MAX_MAIL_LINE,
    TOO_BIG,
    CommandError,
    DotDecoder,
    HopCounter,
    _fields,
    format_reply,
    parse_mail_params,
    parse_params,
    parse_rcpt_params,
    received_header,
    split_path,
    with_protocol,
    xtext_decode,
)
from .spool import Spool, SpoolWriter

__all__ = [
    "SMTPServerFactory",
    "SMTPServer",
    # Re-exported from smtpproto for older imports.
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
]

log = Logger()

#: Input kept while a commit is in progress before the transport is paused.
MAX_PENDING_INPUT = 65536
#: Control characters never allowed in a command line (TAB is tolerated).
_BAD_COMMAND_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(r"[0-9]{1,20}\Z")

# Canned replies.
OK = Reply(250, "2.0.0", "Ok")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
NO_RECIPIENTS = Reply(554, "5.5.1", "Error: no valid recipients")
BARE_LINE_ENDING = Reply(550, "5.6.0", "Message contains bare CR or LF; lines must end with CRLF")
LOCAL_ERROR = Reply(451, "4.3.0", "Error: queue file write error")
TLS_READY = Reply(220, "2.0.0", "Ready to start TLS")
TLS_ACTIVE = Reply(503, "5.5.1", "Error: TLS already active")
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available due to local problem")
IN_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
AUTH_DISABLED = Reply(503, "5.5.1", "Error: authentication not enabled")
AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication Exchange line is too long")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops")

# Why the session reads no command: a commit or an AUTH check is in flight,
# the client is not reading our replies (the transport's write buffer is
# full: it called pauseProducing), or the soft error limit's delay runs.
BUSY, OUTPUT, SLEEP = "busy", "output", "sleep"
#: Seconds every reply waits once the soft error limit is reached (Postfix smtpd_error_sleep_time).
ERROR_SLEEP = 1.0
#: Verbs whose lines may exceed MAX_LINE (MAIL, RCPT: MAX_MAIL_LINE; AUTH: MAX_AUTH_LINE).
_LONG_VERBS = (b"MAIL ", b"RCPT ", b"AUTH ")


def _reply(t: tuple[int, str, str]) -> Reply:
    """An L{auth} C{REPLY_*} tuple as a L{Reply}."""
    return Reply(*t)


# -- the protocol --------------------------------------------------------------------------

COMMAND, DATA, BDAT, DISCARD, SASL = "command", "data", "bdat", "discard", "sasl"
NOT_IMPLEMENTED = {"ETRN", "TURN", "ATRN", "SEND", "SOML", "SAML"}


@dataclass
class Transaction:
    """One mail transaction: from MAIL to the end of DATA / BDAT LAST, or RSET."""

    sender: str
    esmtp: dict[str, Any]
    recipients: dict[str, Recipient] = field(default_factory=dict)
    accepted: list[str] = field(default_factory=list)  # RCPT TO addresses accepted, as given
    writer: SpoolWriter | None = None
    decoder: DotDecoder | None = None
    hops: HopCounter = field(default_factory=HopCounter)
    size: int = 0
    error: Reply | None = None  # first problem found while reading the message
    bdat: bool = False

    @property
    def smtputf8(self) -> bool:
        return bool(self.esmtp.get("smtputf8"))


@implementer(IHalfCloseableProtocol, IHandshakeListener, IPushProducer)
class SMTPServer(protocol.Protocol):
    """
    One SMTP session.  See the module docstring for how bytes are read.

    The session is a streaming producer registered on its own transport:
    when the client does not read our replies and the transport's write
    buffer fills, the transport calls L{pauseProducing} and the session
    stops executing commands (and stops reading) until L{resumeProducing}.
    It is half-close aware (L{readConnectionLost}): a client that sends
    its commands and shuts down its sending side still gets every reply.
    """

    factory: "SMTPServerFactory"

    def __init__(self, factory: "SMTPServerFactory") -> None:
        self.factory = factory
        self.config = factory.config
        # Implicit TLS (smtps): the factory is wrapped in TLS by
        # tls.implicit_tls_endpoint, so the session is encrypted from the start.
        self.session = Session(client_ip="", listener=factory.listener, tls=factory.listener == "smtps")
        # Input not yet consumed is self._buf[self._pos:]; lines are cut
        # by moving _pos, and the buffer is sliced once per _process run.
        self._buf = b""
        self._pos = 0
        self._mode = COMMAND
        self._esmtp = False
        self._tx: Transaction | None = None
        self._bdat_left = 0
        self._bdat_last = False
        self._bdat_error: Reply | None = None
        self._errors = 0
        self._closed = False
        self._eof = False  # the client shut down its sending side
        self._pauses: set[str] = set()  # BUSY, OUTPUT, SLEEP: no command is executed
        self._processing = False
        self._paused = False  # whether we paused the transport's reading
        self._counted = False
        self._starttls = False  # STARTTLS answered, handshake not yet complete
        self._timer: IDelayedCall | None = None
        self._sleep: IDelayedCall | None = None
        self._slept = False  # the error delay for the next reply has been served
        self._held: Transaction | None = None  # a complete message whose reply waits for that delay
        self._sasl: auth.SASLExchange | None = None
        self._auth_wait: defer.Deferred[Any] | None = None
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
            "STARTTLS": self.do_starttls,
            "AUTH": self.do_auth,
        }

    @property
    def _busy(self) -> bool:
        """A commit or an AUTH check is in flight: nothing more is read until it is answered."""
        return BUSY in self._pauses

    @_busy.setter
    def _busy(self, value: bool) -> None:
        if value:
            self._pauses.add(BUSY)
        else:
            self._pauses.discard(BUSY)

    # -- connection ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.session.client_ip = getattr(self.transport.getPeer(), "host", "")
        if not self.factory.admit(self.session.client_ip):
            self._write(421, "4.7.0", f"{self.config.hostname} Error: too many connections")
            self._close()
            return
        self._counted = True
        mail_event(
            "connection",
            "connect from [{client}] listener={listener} tls={tls}",
            client=self.session.client_ip, listener=self.session.listener, tls=self.session.tls,
        )
        self.transport.registerProducer(self, True)
        self._timer = self.factory.clock.callLater(self.config.timeout, self._timed_out)
        self._write(220, "", f"{self.config.hostname} ESMTP mailhub")

    def connectionLost(self, reason: Any = None) -> None:
        self._closed = True
        self._cancel_timer()
        self._sasl = None
        wait, self._auth_wait = self._auth_wait, None
        if wait is not None:
            wait.cancel()
        self._reset_transaction()
        if self._counted:
            self._counted = False
            self.factory.release(self.session.client_ip)

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        self._buf = self._buf + data if self._buf else data
        if self._pauses:
            self._update_reading()
            return
        self._process()

    # IHalfCloseableProtocol

    def readConnectionLost(self) -> None:
        """
        The client shut down its sending side (C{shutdown(SHUT_WR)}) after,
        typically, a whole pipelined transaction and QUIT.  Everything it
        sent is still executed and answered; the connection is closed once
        the replies are written (L{_process} does it when nothing more can
        be executed).  A half-received command or message is dropped.
        """
        if self._eof:
            return
        self._eof = True
        if not self._closed:
            self._process()

    def writeConnectionLost(self) -> None:
        """The client can no longer receive replies: nothing more is worth doing."""
        if not self._closed:
            self._reset_transaction()
            self._close()

    # IPushProducer: called by the transport about its write buffer

    def pauseProducing(self) -> None:
        """The client is not reading our replies (or TLS is not ready): execute nothing more."""
        self._pauses.add(OUTPUT)
        self._update_reading()

    def resumeProducing(self) -> None:
        """The write buffer drained: go on with the buffered commands."""
        if OUTPUT in self._pauses:
            self._pauses.discard(OUTPUT)
            self._process()

    def stopProducing(self) -> None:
        """The transport is going away; L{connectionLost} follows and cleans up."""

    # IHandshakeListener

    def handshakeCompleted(self) -> None:
        """The TLS handshake after STARTTLS succeeded (for smtps the C{connection} event says tls)."""
        if self._starttls and not self._closed:
            self._starttls = False
            mail_event(
                "starttls",
                "STARTTLS from [{client}] listener={listener}",
                client=self.session.client_ip, listener=self.session.listener,
            )

    # -- timers ------------------------------------------------------------------------------

    def _touch(self) -> None:
        """
        A request was completed (a command line, the end of a message):
        the client again has the full C{timeout} for the next one.  Bytes
        of an unfinished line do not count, so a client trickling one byte
        a second still times out (Postfix smtpd_per_request_deadline).
        """
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.config.timeout)

    def _extend(self, n: int) -> None:
        """
        C{n} message bytes arrived: the deadline moves out by
        C{n / min_data_rate} seconds, never beyond C{timeout} from now
        (Postfix smtpd_min_data_rate).  A client sending slower than the
        minimum rate runs out of time; a faster one never does.
        """
        timer = self._timer
        rate = self.factory.min_data_rate
        if timer is None or not timer.active() or not n or rate <= 0:
            return
        now = self.factory.clock.seconds()
        deadline = min(timer.getTime() + n / rate, now + self.config.timeout)
        timer.reset(deadline - now)

    def _timed_out(self) -> None:
        self._timer = None
        if self._closed:
            return
        stuck = OUTPUT in self._pauses
        self._reset_transaction()
        self._sasl = None
        self._write(421, "4.4.2", f"{self.config.hostname} Error: timeout exceeded")
        self._close()
        if stuck:
            # The client reads nothing: the 421 and the replies before it
            # would wait forever in the write buffer.
            abort = getattr(self.transport, "abortConnection", None)
            if abort is not None:
                abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._sleep is not None and self._sleep.active():
            self._sleep.cancel()
        self._sleep = None

    def _close(self) -> None:
        self._closed = True
        self._cancel_timer()
        # Unregister first: a TLS transport does not shut down while a
        # producer is registered, and a TCP transport whose buffer drains
        # resumes a paused producer instead of closing.
        if self._counted:
            self.transport.unregisterProducer()
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
                self._write(421, "4.7.0", f"{self.config.hostname} Error: too many errors")
                self._close()

    def _must_sleep(self) -> bool:
        """
        After C{soft_error_limit} errors every reply waits one second
        (Postfix smtpd_soft_error_limit / smtpd_error_sleep_time), through
        the clock: the session executes nothing meanwhile, so pipelined
        commands stay in order.  True if that wait was just started.
        """
        limit = self.factory.soft_error_limit
        if not limit or self._errors < limit:
            return False
        if self._slept:
            self._slept = False
            return False
        self._pauses.add(SLEEP)
        self._sleep = self.factory.clock.callLater(ERROR_SLEEP, self._wake)
        return True

    def _wake(self) -> None:
        self._sleep = None
        self._pauses.discard(SLEEP)
        if self._closed:
            return
        held, self._held = self._held, None
        if held is not None:
            self._finish_message(held)  # the end of data waited
        else:
            self._slept = True  # the next command line goes first
        self._process()

    # -- input loop ------------------------------------------------------------------------------

    def _process(self) -> None:
        """
        Execute what is buffered, until it runs out or something pauses the
        session.  Lines are cut by moving C{_pos}; the buffer is sliced once
        at the end, so many small pipelined commands cost linear time.
        """
        if self._processing:
            return
        self._processing = True
        lines = 0
        try:
            while not self._closed and not self._pauses:
                buf, pos = self._buf, self._pos
                if pos >= len(buf):
                    break
                mode = self._mode
                if mode == DATA:
                    self._buf, self._pos = b"", 0
                    self._data_chunk(buf[pos:] if pos else buf)
                elif mode == BDAT:
                    end = min(pos + self._bdat_left, len(buf))
                    self._pos = end
                    self._bdat_chunk(buf[pos:end])
                elif mode == DISCARD:
                    i = buf.find(b"\n", pos)
                    if i < 0:
                        self._pos = len(buf)
                        break
                    self._pos = i + 1
                    self._mode = COMMAND
                    lines += 1
                else:
                    limit = self._line_limit(buf, pos)
                    i = buf.find(b"\n", pos, pos + limit)
                    if i < 0:
                        if len(buf) - pos < limit:
                            break
                        self._line_too_long()
                        continue
                    if self._must_sleep():
                        break
                    lines += 1
                    self._pos = i + 1
                    length = i + 1 - pos  # with its CRLF (or bare LF)
                    if i > pos and buf[i - 1] == 13:  # CR
                        i -= 1
                    if self._mode == SASL:
                        self._sasl_line(buf[pos:i])
                    elif length > MAX_LINE and buf[pos : pos + 5].upper() not in _LONG_VERBS:
                        self.reply(LINE_TOO_LONG)  # RFC 5321 4.5.3.1.4: 512 with CRLF
                    else:
                        self._command(buf[pos:i])
        finally:
            self._processing = False
            if self._pos:
                self._buf = self._buf[self._pos :]
                self._pos = 0
        if self._closed:
            return
        if lines:
            self._touch()
        if self._eof and not self._pauses:
            # Everything the half-closed client sent is answered; what is
            # left cannot become a command.  loseConnection writes the
            # replies out first.
            self._reset_transaction()
            self._close()
            return
        self._update_reading()

    def _update_reading(self) -> None:
        """
        Pause the transport's reading while the session executes nothing
        (the client does not read our replies, a commit or AUTH check is
        in flight, the error delay runs) and more than
        L{MAX_PENDING_INPUT} octets wait; resume when it goes on.  So a
        client that pipelines without reading holds at most that much
        input and the transport's write buffer (plus one batch of replies)
        in memory.  Reading is not paused at once on L{pauseProducing}: a
        TLS layer pauses its producer while the handshake is in progress,
        and the handshake needs reading.  Never resumed after the
        client's EOF.
        """
        if self._closed or self._eof:
            return
        want = bool(self._pauses) and len(self._buf) - self._pos > MAX_PENDING_INPUT
        if want != self._paused:
            self._paused = want
            if want:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def _line_limit(self, buf: bytes, pos: int) -> int:
        """
        How far to look for the end of a command line: 12288 octets for
        AUTH and SASL responses (RFC 4954 4), 2048 for the others (the 512
        limit is checked per verb once the line is complete: MAIL and RCPT
        may use up to 2048 for their parameters).
        """
        if self._mode == SASL or buf[pos : pos + 5].upper() == b"AUTH ":
            return MAX_AUTH_LINE
        return MAX_MAIL_LINE

    def _line_too_long(self) -> None:
        self._mode = DISCARD
        if self._sasl is not None:
            self._sasl = None
            self.reply(AUTH_LINE_TOO_LONG)
        else:
            self.reply(LINE_TOO_LONG)

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
        for tx in (self._tx, self._held):
            if tx is not None and tx.writer is not None:
                tx.writer.abort()
        self._tx = self._held = None

    def reset_session(self) -> None:
        """
        Forget everything the client told us: the transaction, HELO/EHLO
        and the authenticated user.  The one place to call when the
        channel changes under the client (STARTTLS, RFC 3207 4.2).
        """
        self._reset_transaction()
        self._esmtp = False
        self._sasl = None
        self.session.helo = None
        self.session.authenticated_user = None

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
        ]
        if self._starttls_offered():
            lines.append("STARTTLS")
        if self._auth_offered():
            lines.append("AUTH " + " ".join(auth.MECHANISMS))
        lines += [
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

    def _sender_error(self, e: address.AddressError) -> Reply:
        """
        A bad MAIL FROM path, with the sender codes of RFC 3463: X.1.7 bad
        sender mailbox syntax, X.1.8 bad sender system address (the domain);
        the recipient codes X.1.3 / X.1.2 are for RCPT.
        """
        if e.enhanced == "5.1.3":
            return Reply(501, "5.1.7", f"Bad sender address syntax: {e}")
        if e.enhanced == "5.1.2":
            return Reply(501, "5.1.8", f"Bad sender system address: {e}")
        return self._address_error(e, "sender")

    def do_mail(self, arg: str) -> None:
        if self.session.helo is None:
            raise CommandError(*_fields(NEED_HELO))
        if self._tx is not None:
            raise CommandError(503, "5.5.1", "Error: nested MAIL command")
        refusal = self.factory.policy.check_mail(self.session)  # 530 on submission without AUTH
        if refusal is not None:
            raise CommandError(*_fields(refusal))
        if arg[:5].upper() != "FROM:":
            raise CommandError(501, "5.5.4", "Syntax: MAIL FROM:<address>")
        try:
            path, words = split_path(arg[5:])
        except CommandError as e:
            if e.reply.enhanced == "5.1.3":
                raise CommandError(501, "5.1.7", "Bad sender address syntax") from None
            raise
        if not path:  # "MAIL FROM:" is not the null sender; "<>" is
            raise CommandError(501, "5.5.4", "Syntax: MAIL FROM:<address>")
        esmtp = parse_mail_params(parse_params(words), self.config.max_message_size)
        try:
            sender = address.parse_path(path, allow_utf8=esmtp["smtputf8"])
        except address.AddressError as e:
            self.reply(self._sender_error(e))
            return
        sender_text = "" if sender is None else str(sender)
        refusal = self.factory.policy.check_sender(
            self.session, sender_text, self.factory.may_send_as, self.factory.sender_check
        )
        if refusal is not None:
            mail_event(
                "reject",
                "NOQUEUE: reject: MAIL from [{client}]: {code} {enhanced} {text}; from=<{sender}> sasl_username={user}",
                client=self.session.client_ip, code=refusal.code, enhanced=refusal.enhanced,
                text=refusal.text, sender=sender_text, user=self.session.authenticated_user,
            )
            self.reply(refusal)
            return
        self._tx = Transaction(sender=sender_text, esmtp=esmtp)
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
        if not path:
            raise CommandError(501, "5.5.4", "Syntax: RCPT TO:<address>")
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
            user = self.session.authenticated_user
            tx.writer.write(
                received_header(
                    self.session.helo or "", self.session.client_ip, self.config.hostname,
                    self._protocol_name(tx), tx.writer.queue_id, one, self.factory.clock.seconds(),
                    auth_user=user if self.factory.received_auth_user else None,
                    hide_client=bool(user) and self.factory.hide_client_ip,
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

    # -- STARTTLS (RFC 3207) ---------------------------------------------------------------------

    def _starttls_offered(self) -> bool:
        """On smtp and submission listeners with a certificate, until TLS is up."""
        return self.factory.tls is not None and not self.session.tls

    def do_starttls(self, arg: str) -> None:
        if arg:
            raise CommandError(501, "5.5.4", "Syntax: STARTTLS")
        if self.session.tls:
            raise CommandError(*_fields(TLS_ACTIVE))
        if self.factory.tls is None:
            raise CommandError(502, "5.5.1", "Error: STARTTLS not implemented")
        if self._tx is not None:
            raise CommandError(*_fields(IN_TRANSACTION))
        if not ITLSTransport.providedBy(self.transport):
            raise CommandError(*_fields(TLS_UNAVAILABLE))
        self.reply(TLS_READY)
        # CVE-2011-0411: whatever the client pipelined after STARTTLS was
        # sent in clear text and may have been injected by a man in the
        # middle; it must never be executed as if it came over TLS.
        # Bytes arriving after startTLS() go to the TLS layer instead.
        pending = len(self._buf) - self._pos
        if pending:
            log.info(
                "STARTTLS from [{client}]: {n} pipelined plaintext octets discarded",
                client=self.session.client_ip, n=pending,
            )
        self._buf, self._pos = b"", 0
        self.reset_session()
        self._starttls = True
        try:
            self.transport.startTLS(self.factory.tls.options())
        except Exception:
            log.failure("STARTTLS failed for [{client}]", client=self.session.client_ip)
            self._close()
            return
        self.session.tls = True

    # -- AUTH (RFC 4954) ------------------------------------------------------------------------

    def _auth_offered(self) -> bool:
        """
        PLAIN and LOGIN carry the password in clear: offered only with a
        users file, and only over TLS or (if allowed) from 127.0.0.1 / ::1.
        """
        f = self.factory
        if f.checker is None:
            return False
        return self.session.tls or (f.allow_plaintext_loopback and is_loopback(self.session.client_ip))

    def do_auth(self, arg: str) -> None:
        f = self.factory
        if f.checker is None:
            raise CommandError(502, "5.5.1", "Error: AUTH not implemented")
        if self.session.helo is None:
            raise CommandError(*_fields(NEED_HELO))
        if self.session.authenticated_user:
            raise CommandError(*auth.REPLY_ALREADY_AUTHENTICATED)
        if self._tx is not None:
            raise CommandError(*_fields(IN_TRANSACTION))
        if not self._auth_offered():
            if self._starttls_offered():
                raise CommandError(*auth.REPLY_ENCRYPTION_REQUIRED)  # 538 5.7.11
            raise CommandError(*_fields(AUTH_DISABLED))
        if f.throttle is not None and f.throttle.blocked(self.session.client_ip):
            self._write(*auth.REPLY_TOO_MANY_FAILURES)
            self._close()
            return
        mechanism, _, initial = arg.partition(" ")
        if not mechanism:
            raise CommandError(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
        initial = initial.strip(" ")
        try:
            self._sasl = auth.SASLExchange(mechanism, initial.encode("utf-8") if initial else None)
        except auth.SASLError as e:
            raise CommandError(*e.reply) from None
        self._sasl_step()

    def _sasl_step(self) -> None:
        """Send the next 334 challenge, or check the credentials once complete."""
        exchange = self._sasl
        assert exchange is not None
        try:
            step = exchange.next()
        except auth.SASLError as e:
            self._sasl_end(_reply(e.reply))
            return
        if isinstance(step, bytes):
            self._mode = SASL
            self.transport.write(b"334 " + step + b"\r\n")
            return
        self._sasl = None
        self._mode = COMMAND
        self._busy = True  # read nothing more until the answer (and any delay) is sent
        d = defer.maybeDeferred(self.factory.checker.requestAvatarId, step)
        self._auth_wait = d
        d.addBoth(self._auth_checked, exchange.mechanism)

    def _sasl_line(self, line: bytes) -> None:
        """A client response inside an AUTH exchange (never a command)."""
        exchange = self._sasl
        if exchange is None:  # cannot happen; be safe
            self._mode = COMMAND
            self._command(line)
            return
        try:
            exchange.feed(line)  # "*" cancels: 501 5.7.0
        except auth.SASLError as e:
            self._sasl_end(_reply(e.reply))
            return
        self._sasl_step()

    def _sasl_end(self, reply: Reply) -> None:
        self._sasl = None
        self._mode = COMMAND
        self.reply(reply)

    def _auth_checked(self, result: Any, mechanism: str) -> None:
        self._auth_wait = None
        if self._closed:
            return None  # also swallows the CancelledError of connectionLost
        client = self.session.client_ip
        if isinstance(result, Failure):
            if result.check(UnauthorizedLogin):
                # The user name is not logged: clients type passwords into it.
                log.info("AUTH {mechanism} failed from [{client}]", mechanism=mechanism, client=client)
                throttle = self.factory.throttle
                wait = throttle.failed(client) if throttle is not None else defer.succeed(False)
                self._auth_wait = wait
                wait.addBoth(self._auth_throttled)
                return None
            log.failure("AUTH checker error for [{client}]", result, client=client)
            self._auth_done(_reply(auth.REPLY_TEMPORARY_FAILURE))
            return None
        self.session.authenticated_user = str(result)
        log.info(
            "AUTH {mechanism} from [{client}]: sasl_username={user}",
            mechanism=mechanism, client=client, user=self.session.authenticated_user,
        )
        self._auth_done(_reply(auth.REPLY_AUTH_OK))
        return None

    def _auth_throttled(self, close: Any) -> None:
        self._auth_wait = None
        if self._closed:
            return None
        if isinstance(close, Failure):
            log.failure("AUTH throttle error", close)
            close = False
        if close:
            self._busy = False
            self._write(*auth.REPLY_TOO_MANY_FAILURES)
            self._close()
            return None
        self._auth_done(_reply(auth.REPLY_AUTH_FAILED))
        return None

    def _auth_done(self, reply: Reply) -> None:
        self._busy = False
        self.reply(reply)
        self._process()

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

    def _count_hops(self, tx: Transaction, body: bytes) -> None:
        """
        Count C{Received:} fields in the header section (RFC 5321 6.3): a
        message that would leave here with more than C{max_hops} of them
        (ours included) is looping and is refused at the end of the data.
        """
        hops = tx.hops
        if hops.done:
            return
        hops.feed(body)
        limit = self.factory.max_hops
        if limit and hops.count >= limit and tx.error is None:
            self._fail(tx, TOO_MANY_HOPS)

    def _data_chunk(self, data: bytes) -> None:
        tx = self._tx
        assert tx is not None and tx.decoder is not None
        self._extend(len(data))
        body, rest = tx.decoder.feed(data)
        if tx.decoder.bare_line_ending and tx.error is None:
            self._fail(tx, BARE_LINE_ENDING)
        self._count_hops(tx, body)
        self._take(tx, body)
        if rest is not None:
            self._buf, self._pos = rest + self._buf[self._pos :], 0
            self._mode = COMMAND
            self._end_of_message(tx)

    def _bdat_chunk(self, data: bytes) -> None:
        self._bdat_left -= len(data)
        self._extend(len(data))
        tx = self._tx
        if self._bdat_error is None and tx is not None:
            self._count_hops(tx, data)
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
        """The message is complete (after the error delay, if one is due): see L{_finish_message}."""
        self._tx = None
        self._touch()
        if self._must_sleep():
            self._held = tx
            return
        self._finish_message(tx)

    def _finish_message(self, tx: Transaction) -> None:
        """Reject the message, or commit it and answer 250 only once it is durable."""
        if tx.error is not None:
            if tx.writer is not None:
                tx.writer.abort()
            if tx.error is TOO_MANY_HOPS:
                mail_event(
                    "reject",
                    "NOQUEUE: reject: DATA from [{client}]: {code} {enhanced} {text}; hops={hops} from=<{sender}>",
                    client=self.session.client_ip, code=tx.error.code, enhanced=tx.error.enhanced,
                    text=tx.error.text, hops=tx.hops.count, sender=tx.sender, reason="too_many_hops",
                )
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
        # Logged before enqueue: enqueue may deliver at once, and the story
        # of a message in the log must start with its arrival.
        mail_event(
            "accepted",
            "{queue_id}: accepted from=<{sender}> nrcpt={nrcpt} size={size} client=[{client}] proto={proto}"
            " listener={listener} sasl_username={user}",
            queue_id=envelope.queue_id, sender=envelope.sender, nrcpt=len(envelope.recipients),
            size=envelope.esmtp["size"], client=envelope.client["addr"], proto=envelope.client["protocol"],
            listener=envelope.client["listener"], user=envelope.client["user"],
            **{"from": envelope.sender},
        )
        try:
            self.factory.enqueue(envelope)
        except Exception:
            # Committed means queued: the scheduler finds it again at start.
            log.failure("enqueue failed for {queue_id}", queue_id=envelope.queue_id)
        self._errors = 0  # Postfix: the hard limit counts errors "without delivering mail"
        self.reply(Reply(250, "2.0.0", f"Ok: queued as {envelope.queue_id}"))
        self._process()

    def _commit_failed(self, failure: Any, envelope: Envelope) -> None:
        self._busy = False
        log.failure("commit failed for {queue_id}", failure, queue_id=envelope.queue_id)
        self.reply(LOCAL_ERROR)
        self._process()


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

    Submission and security (all optional; the defaults are a plain MX
    listener without STARTTLS or AUTH):

    @param tls: the L{mailhub.tls.ServerTLS}; STARTTLS is offered on
        C{smtp} and C{submission} listeners when given.  For C{smtps} wrap
        the factory with L{mailhub.tls.implicit_tls_endpoint}; the session
        counts as encrypted from the start (C{tls} may then be C{None}).
    @param users: the L{mailhub.auth.UsersFile}: enables AUTH PLAIN/LOGIN
        (through C{checker}, default C{auth.UsersChecker(users)}) and is
        asked who owns which sender.
    @param checker: a twisted.cred checker for L{IUsernamePassword} whose
        avatar id is the user's address; overrides the one built from
        C{users} (tests pass one that does not use threads).
    @param throttle: the L{mailhub.auth.AuthThrottle}, shared by all
        listeners; default C{AuthThrottle(clock)} (1 s delay, 5 failures
        per 300 s per client IP) whenever AUTH is enabled.
    @param sender_check: C{"strict"}: an authenticated user may only use
        envelope senders they own (553 5.7.1); C{"off"} (or C{"none"}).
    @param allow_plaintext_loopback: offer AUTH without TLS to clients at
        exactly 127.0.0.1 or ::1 (L{mailhub.policy.is_loopback}).
    @param hide_client_ip: for authenticated sessions, write the Received
        header without the client's HELO and IP address.
    @param received_auth_user: add C{(Authenticated sender: USER)} to the
        Received header of authenticated sessions (not with
        C{hide_client_ip}).
    @param extension_separator: the address extension separator the
        sender check allows (C{alice+x@...} is alice's); C{""} disables.

    Limits (Postfix 3.7 defaults; 0 disables each):

    @param max_hops: a message carrying C{max_hops} or more C{Received:}
        header fields (so more than C{max_hops} with ours) is refused at
        the end of DATA / BDAT with C{554 5.4.6 Too many hops}: two MTAs
        forwarding to each other stop (Postfix hopcount_limit, RFC 5321 6.3).
    @param min_data_rate: octets per second a client must keep up in
        DATA / BDAT: each received buffer extends the deadline by
        C{len / min_data_rate} seconds, at most to C{config.timeout} from
        now (Postfix smtpd_min_data_rate).  Outside message data only a
        complete command line resets the timeout.
    @param soft_error_limit: after this many errors in a session every
        reply waits one second (Postfix smtpd_soft_error_limit,
        smtpd_error_sleep_time); C{None}: C{config.soft_error_limit}.
        C{config.max_errors} (hard limit) still closes the session.
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
        *,
        tls: Any = None,
        users: auth.UsersFile | None = None,
        checker: Any = None,
        throttle: auth.AuthThrottle | None = None,
        sender_check: str = "strict",
        allow_plaintext_loopback: bool = False,
        hide_client_ip: bool = False,
        received_auth_user: bool = False,
        extension_separator: str = "+",
        max_hops: int = 50,
        min_data_rate: int = 500,
        soft_error_limit: int | None = None,
    ) -> None:
        if sender_check not in SENDER_CHECKS:
            raise ValueError(f"sender_check must be one of {', '.join(SENDER_CHECKS)}, not {sender_check!r}")
        self.tls = tls
        self.users = users
        if checker is None and users is not None:
            checker = auth.UsersChecker(users)
        self.checker = checker
        if throttle is None and checker is not None:
            throttle = auth.AuthThrottle(clock)
        self.throttle = throttle
        self.sender_check = sender_check
        self.allow_plaintext_loopback = allow_plaintext_loopback
        self.hide_client_ip = hide_client_ip
        self.received_auth_user = received_auth_user
        self.extension_separator = extension_separator
        self.max_hops = max_hops
        self.min_data_rate = min_data_rate
        if soft_error_limit is None:
            soft_error_limit = getattr(config, "soft_error_limit", 10)
        self.soft_error_limit = soft_error_limit
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

    def may_send_as(self, user: str, sender: str) -> bool:
        """Whether C{user} owns envelope sender C{sender} (for L{Policy.check_sender})."""
        if self.users is not None:
            return self.users.may_send_as(user, sender, separator=self.extension_separator)
        return auth.owns_sender(user, sender, separator=self.extension_separator)

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
