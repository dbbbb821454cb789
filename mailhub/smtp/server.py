"""
The ESMTP server: mailhub's own protocol and factory (not twisted.mail.smtp).

Owns: the SMTP conversation with a client (RFC 5321) and its extensions
PIPELINING (RFC 2920), SIZE (RFC 1870), 8BITMIME (RFC 6152),
ENHANCEDSTATUSCODES (RFC 2034/3463), SMTPUTF8 (RFC 6531), CHUNKING
(RFC 3030), DSN parameters (RFC 3461); reading and dispatching command
lines, the command handlers, the hard error limit, and the factory
(settings, connection counting).  The session is assembled from one
module per job, each saying what it owns:

- L{mailhub.smtp.proto}: the pure pieces (reply formatting, parameter
  parsing, L{DotDecoder}, L{HopCounter}, the Received header);
- L{mailhub.smtp.transaction}: message bytes from DATA / BDAT into the spool, the
  hop limit, the envelope and the commit (250 only once it is durable);
- L{mailhub.smtp.tlsauth}: STARTTLS (RFC 3207) and AUTH PLAIN/LOGIN (RFC 4954);
- L{mailhub.smtp.limits}: deadlines, the minimum data rate, the soft error
  delay and flow control.

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
characters or invalid UTF-8.  A client that shuts down its sending side
(half-close) still gets every reply before the server closes.

Replies: every reply after the greeting carries an RFC 3463 enhanced code,
except the replies to HELO/EHLO (RFC 2034 section 3 excludes them) and the
intermediate C{354} (RFC 3463 defines no class 3).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IPushProducer,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from mailhub import address

from mailhub.smtp import sasl as auth
from mailhub.users import UsersChecker, UsersFile, owns_sender

from mailhub.smtp import proto as smtpproto
from mailhub.envelope import Envelope, Recipient
from mailhub.eagerwrite import write_now
from mailhub.maillog import mail_event
from mailhub.smtp.policy import SENDER_CHECKS, Policy, Session
from mailhub.smtp.tlsauth import AUTH_LINE_TOO_LONG, TLSAuthMixin
from mailhub.smtp.transaction import MessageMixin, Transaction
from mailhub.smtp.limits import LimitsMixin
from mailhub.smtp.stats import UNKNOWN, CommandCounts
from mailhub.smtp.proto import (  # noqa: F401 (names re-exported for older imports)
    _DIGITS,
    BDAT,
    COMMAND,
    DATA,
    DISCARD,
    MAX_AUTH_LINE,
    MAX_LINE,
    MAX_MAIL_LINE,
    NEED_HELO,
    SASL,
    CommandError,
    Reply,
    DotDecoder,
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
from mailhub.queue.spool import Spool

#: SMTPServerFactory, SMTPServer, and smtpproto's names (re-exported for older imports).
__all__ = ["SMTPServerFactory", "SMTPServer", *smtpproto.__all__]

log = Logger()

#: Control characters never allowed in a command line (TAB is tolerated).
_BAD_COMMAND_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

# Canned replies.
OK = Reply(250, "2.0.0", "Ok")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
NO_RECIPIENTS = Reply(554, "5.5.1", "Error: no valid recipients")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
NO_STORAGE = Reply(452, "4.3.1", "Insufficient system storage")
#: Seconds a measurement of the spool's free space is reused (a flood of MAIL commands costs one statvfs a second).
FREE_SPACE_CACHE = 1.0

#: Verbs whose lines may exceed MAX_LINE (MAIL, RCPT: MAX_MAIL_LINE; AUTH: MAX_AUTH_LINE).
_LONG_VERBS = (b"MAIL ", b"RCPT ", b"AUTH ")


# -- the protocol --------------------------------------------------------------------------

NOT_IMPLEMENTED = {"ETRN", "TURN", "ATRN", "SEND", "SOML", "SAML"}


#: Replies to pipelined commands are held back and sent together (see
#: L{SMTPServer._send}) up to this many bytes at a time.
REPLY_BATCH = 4096


@implementer(IHalfCloseableProtocol, IHandshakeListener, IPushProducer)
class SMTPServer(MessageMixin, TLSAuthMixin, LimitsMixin, protocol.Protocol):
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
        self._client_left = False  # we closed because the client half-closed or stopped reading
        self._pauses: set[str] = set()  # BUSY, OUTPUT, SLEEP: no command is executed
        self._processing = False
        self._out: list[bytes] | None = None  # replies held back while _process runs (see _send)
        self._out_len = 0
        self._paused = False  # whether we paused the transport's reading
        self._counted = False
        self._starttls = False  # STARTTLS answered, handshake not yet complete
        self._handshaking = False  # a TLS handshake is under way (STARTTLS or smtps)
        self._tls_timer: IDelayedCall | None = None  # its deadline (starttls_timeout)
        self._timer: IDelayedCall | None = None
        self._sleep: IDelayedCall | None = None
        self._slept = False  # the error delay for the next reply has been served
        self._held: Transaction | None = None  # a complete message whose reply waits for that delay
        self._sasl: auth.SASLExchange | None = None
        self._auth_wait: defer.Deferred[Any] | None = None
        self._commands = CommandCounts()  # for the "disconnect from" line
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

    # -- connection ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.session.client_ip = getattr(self.transport.getPeer(), "host", "")
        if not self.factory.admit(self.session.client_ip):
            # Postfix's anvil warns about each connection over a limit; here
            # it is a reject event (metrics: rejected_total{reason}) saying which limit.
            limit = "max_connections" if self.factory.connections >= self.config.max_connections else "max_connections_per_ip"
            mail_event(
                "reject",
                "NOQUEUE: reject: CONNECT from [{client}]: 421 4.7.0 Error: too many connections; limit={limit} listener={listener}",
                client=self.session.client_ip, code=421, enhanced="4.7.0", text="Error: too many connections",
                limit=limit, listener=self.session.listener, reason="too_many_connections",
            )
            self._write(421, "4.7.0", f"{self.config.hostname} Error: too many connections")
            self._close()
            return
        self._counted = True
        self.factory.sessions.add(self)
        mail_event(
            "connection",
            "connect from [{client}] listener={listener} tls={tls}",
            client=self.session.client_ip, listener=self.session.listener, tls=self.session.tls,
        )
        self.transport.registerProducer(self, True)
        self._timer = self.factory.clock.callLater(self.config.timeout, self._timed_out)
        if isinstance(self.transport, TLSMemoryBIOProtocol):
            self._handshake_started()  # implicit TLS: the greeting waits for the handshake
        self._write(220, "", f"{self.config.hostname} ESMTP mailhub")

    def connectionLost(self, reason: Any = None) -> None:
        # The client left (reset, or half-closed and we closed after it) rather
        # than us closing (QUIT, 421, a timeout): Postfix's "lost connection".
        lost = (not self._closed or self._client_left) and not self._commands.ended_quietly()
        receiving = self._tx is not None and self._mode in (DATA, BDAT)
        received = self._tx.received if self._tx is not None else 0
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
            self._log_disconnect(lost, received if receiving else None)
        self.factory.sessions.discard(self)
        self.factory.session_lost(self)

    def _log_disconnect(self, lost: bool, received: int | None) -> None:
        """
        Postfix's last lines of a session: what the client did
        (L{CommandCounts}); C{received}: the bytes of the message it was
        sending when it left (C{None}: it was not sending one).
        """
        client = self.session.client_ip
        if lost:
            where = self._commands.last if received is None else f"{self._commands.last} ({received} bytes)"
            mail_event(
                "lost_connection", "lost connection after {where} from [{client}]",
                client=client, command=self._commands.last, where=where, received=received,
                listener=self.session.listener,
            )
        mail_event(
            "disconnect", "disconnect from [{client}] {summary}",
            client=client, summary=self._commands.summary(), commands=self._commands.as_dict(),
            listener=self.session.listener,
        )

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        if self._handshaking:
            # Application data comes only out of a completed handshake.
            self._handshake_finished()
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
            self._client_left = True
            self._reset_transaction()
            self._close()

    def _close(self) -> None:
        self._flush_output()
        self._closed = True
        self._cancel_timer()
        # Unregister first: a TLS transport does not shut down while a
        # producer is registered, and a TCP transport whose buffer drains
        # resumes a paused producer instead of closing.
        if self._counted:
            self.transport.unregisterProducer()
        if self._handshaking:
            # A TLS layer whose handshake never completes keeps replies
            # buffered and never closes (loseConnection waits for them).
            self.transport.abortConnection()
            return
        self.transport.loseConnection()

    # -- replies -------------------------------------------------------------------------------

    def _write(self, code: int, enhanced: str, text: str | list[str]) -> None:
        self._commands.replied(code)
        tx = self._tx
        self._send(format_reply(code, enhanced, text, utf8=tx is not None and tx.smtputf8))

    def _send(self, data: bytes) -> None:
        """
        Send reply bytes: at once (L{write_now}), except while L{_process}
        runs a batch of received commands; their replies are then sent
        together when it stops (RFC 2920 3.2: responses to grouped commands
        are best sent as a unit; Postfix's smtpd also flushes only when its
        input is drained), one send for fifty pipelined RCPTs, not fifty.
        """
        out = self._out
        if out is None:
            write_now(self.transport, data)
            return
        out.append(data)
        self._out_len += len(data)
        if self._out_len >= REPLY_BATCH:
            # Flow control still works: a full socket pauses the session
            # (pauseProducing, from inside the write) and the loop stops.
            self._flush_output(keep=True)

    def _flush_output(self, keep: bool = False) -> None:
        """
        Send the replies held back by L{_send}: when L{_process} stops,
        before a close or STARTTLS, and every L{REPLY_BATCH} bytes
        (C{keep}: go on holding back the next ones).
        """
        out, self._out, self._out_len = self._out, ([] if keep else None), 0
        if out:
            write_now(self.transport, b"".join(out))

    def reply(self, reply: Reply) -> None:
        """Send C{reply}; count errors and close after too many (hard error limit)."""
        if self._closed:
            return
        self._write(reply.code, reply.enhanced, reply.text)
        if reply.code >= 400 and reply.code != 421:
            self._errors += 1
            if self.config.max_errors and self._errors >= self.config.max_errors:
                mail_event(
                    "too_many_errors", "too many errors after {command} from [{client}]",
                    client=self.session.client_ip, command=self._commands.last, listener=self.session.listener,
                )
                self._reset_transaction()
                self._write(421, "4.7.0", f"{self.config.hostname} Error: too many errors")
                self._close()

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
        self._out = []
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
            self._flush_output()
        if self._closed:
            return
        if lines:
            self._touch()
        if self._eof and not self._pauses:
            # Everything the half-closed client sent is answered; what is
            # left cannot become a command.  loseConnection writes the
            # replies out first.
            self._client_left = True
            self._reset_transaction()
            self._close()
            return
        self._update_reading()

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
            self._commands.start(UNKNOWN)
            self.reply(Reply(500, "5.5.2", "Error: bad characters in command"))
            return
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._commands.start(UNKNOWN)
            self.reply(Reply(500, "5.5.2", "Error: command is not valid UTF-8"))
            return
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        handler = self._handlers.get(verb)
        self._commands.start(verb if handler is not None or verb in NOT_IMPLEMENTED else UNKNOWN)
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

    def shut_down(self) -> None:
        """
        The server is stopping and this session has no commit in flight:
        say so (RFC 5321 3.8: 421) and close.  A message still arriving is
        dropped; its client got no 250 and sends it again later.
        """
        if self._closed:
            return
        self._reset_transaction()
        self._write(421, "4.3.2", f"{self.config.hostname} Service shutting down, closing transmission channel")
        self._close()

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
        if not self.factory.has_room(esmtp.get("declared_size", 0)):
            mail_event(
                "reject",
                "NOQUEUE: reject: MAIL from [{client}]: {code} {enhanced} {text}; from=<{sender}>",
                client=self.session.client_ip, code=NO_STORAGE.code, enhanced=NO_STORAGE.enhanced,
                text=NO_STORAGE.text, sender=sender_text, reason="insufficient_storage",
            )
            self.reply(NO_STORAGE)
            return
        refusal = self.factory.policy.check_sender(
            self.session, sender_text, self.factory.may_send_as, self.factory.sender_check
        )
        if refusal is not None:
            mail_event(
                "reject",
                "NOQUEUE: reject: MAIL from [{client}]: {code} {enhanced} {text}; from=<{sender}> sasl_username={user}",
                client=self.session.client_ip, code=refusal.code, enhanced=refusal.enhanced,
                text=refusal.text, sender=sender_text, user=self.session.authenticated_user, reason="sender_not_owned",
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

def _call(f: Callable[..., Any], *args: Any) -> Any:
    return f(*args)


def spool_free_space(path: str) -> int:
    """Bytes an unprivileged writer may still use on the file system of C{path} (statvfs f_bavail)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


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
    @param users: the L{mailhub.users.UsersFile}: enables AUTH PLAIN/LOGIN
        (through C{checker}, default C{UsersChecker(users)}) and is
        asked who owns which sender.
    @param checker: a twisted.cred checker for L{IUsernamePassword} whose
        avatar id is the user's address; overrides the one built from
        C{users} (tests pass one that does not use threads).
    @param throttle: the L{mailhub.smtp.sasl.AuthThrottle}, shared by all
        listeners; default C{AuthThrottle(clock)} (1 s delay, 5 failures
        per 300 s per client IP) whenever AUTH is enabled.
    @param sender_check: C{"strict"}: an authenticated user may only use
        envelope senders they own (553 5.7.1); C{"off"} (or C{"none"}).
    @param allow_plaintext_loopback: offer AUTH without TLS to clients at
        exactly 127.0.0.1 or ::1 (L{mailhub.smtp.policy.is_loopback}).
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
    @param starttls_timeout: seconds a TLS handshake (after STARTTLS, or
        on an smtps listener) may take; the idle C{config.timeout} keeps
        running meanwhile.  A session whose handshake does not complete
        in time is aborted and its connection slot freed (Postfix
        smtpd_starttls_timeout).
    @param min_free_space: bytes the spool's file system must keep free
        (the daemon passes C{spool.min_free_space}); below it, or below
        1.5 x C{max_message_size}, or when SIZE= does not fit, MAIL is
        answered C{452 4.3.1 Insufficient system storage} (Postfix
        queue_minfree).  C{None} or 0: no check.
    @param free_space: how to measure the free bytes (default: statvfs
        of the spool directory, L{spool_free_space}); tests pass a fake.
    C{None} for any of these (the default): the value in C{config}, as the
    daemon's C{[server]} section sets it.
    @param soft_error_limit: after this many errors in a session every
        reply waits one second (Postfix smtpd_soft_error_limit,
        smtpd_error_sleep_time); C{None}: C{config.soft_error_limit}.
        C{config.max_errors} (hard limit) still closes the session.
    """

    noisy = False  # no "Starting factory" line at start and stop (mailhub/loglevel.py)

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
        users: UsersFile | None = None,
        checker: Any = None,
        throttle: auth.AuthThrottle | None = None,
        sender_check: str = "strict",
        allow_plaintext_loopback: bool = False,
        hide_client_ip: bool = False,
        received_auth_user: bool = False,
        extension_separator: str = "+",
        max_hops: int | None = None,
        min_data_rate: int | None = None,
        soft_error_limit: int | None = None,
        starttls_timeout: float | None = None,
        min_free_space: int | None = None,
        free_space: Callable[[], int] | None = None,
    ) -> None:
        if sender_check not in SENDER_CHECKS:
            raise ValueError(f"sender_check must be one of {', '.join(SENDER_CHECKS)}, not {sender_check!r}")
        self.tls = tls
        self.users = users
        if checker is None and users is not None:
            checker = UsersChecker(users)
        self.checker = checker
        if throttle is None and checker is not None:
            throttle = auth.AuthThrottle(clock)
        self.throttle = throttle
        self.sender_check = sender_check
        self.allow_plaintext_loopback = allow_plaintext_loopback
        self.hide_client_ip = hide_client_ip
        self.received_auth_user = received_auth_user
        self.extension_separator = extension_separator
        # One source for the limits: the configuration, unless a caller overrides one.
        self.max_hops = getattr(config, "max_hops", 50) if max_hops is None else max_hops
        self.min_data_rate = getattr(config, "min_data_rate", 500) if min_data_rate is None else min_data_rate
        if soft_error_limit is None:
            soft_error_limit = getattr(config, "soft_error_limit", 10)
        self.soft_error_limit = soft_error_limit
        if starttls_timeout is None:
            starttls_timeout = getattr(config, "starttls_timeout", 300.0)
        self.starttls_timeout = starttls_timeout
        self.min_free_space = min_free_space or 0
        self.free_space = free_space if free_space is not None else (lambda: spool_free_space(spool.path))
        self._free: tuple[float, int] | None = None  # (when, bytes): the last measurement
        self.config = config
        self.spool = spool
        self.enqueue = enqueue
        self.policy = policy
        self.clock = clock
        self.listener = listener
        self.run = run
        self.connections = 0
        self.per_ip: dict[str, int] = {}
        # Shutdown drain: commits whose reply is not yet written, sessions
        # closed after their reply until the reply is flushed (see drain).
        self._commits: dict[defer.Deferred[Any], SMTPServer] = {}
        #: every open session (admitted, not yet lost): drain says 421 to the idle ones
        self.sessions: set[SMTPServer] = set()
        self._closing: set[SMTPServer] = set()
        self._drained: list[defer.Deferred[None]] = []
        self.draining = False

    def buildProtocol(self, addr: Any) -> SMTPServer:
        return SMTPServer(self)

    def track_commit(self, session: SMTPServer, d: defer.Deferred[Any]) -> None:
        """
        Remember a commit in flight until its callbacks (which write the 250
        or 451 reply) have run: L{drain} waits for it, so a shutdown never
        queues a message whose client did not get its reply.
        """
        self._commits[d] = session

        def done(result: object) -> object:
            self._commits.pop(d, None)
            if self.draining and not session._closed and not session._busy:
                # The reply is in the transport's buffer: loseConnection
                # flushes it before closing, the reactor's disconnectAll
                # would drop it.  Wait for connectionLost.
                self._closing.add(session)
                session._close()
            self._check_drained()
            return result

        d.addBoth(done)

    def session_lost(self, session: SMTPServer) -> None:
        """Called by each session's connectionLost (ends its part of L{drain})."""
        if self._closing:
            self._closing.discard(session)
            self._check_drained()

    def drain(self, timeout: float = 30.0) -> defer.Deferred[None]:
        """
        Begin shutdown (call after the port stopped listening): the returned
        Deferred fires once every commit in flight has finished, its reply
        was written and flushed (the session is closed after it), and every
        other session was told C{421 4.3.2} and closed (RFC 5321 3.8), or
        after C{timeout} seconds, whichever comes first.
        """
        self.draining = True
        d: defer.Deferred[None] = defer.Deferred()
        self._drained.append(d)
        committing = set(self._commits.values())
        for session in list(self.sessions):
            if session not in committing and not session._closed:
                self._closing.add(session)
                session.shut_down()
        if not self._commits and not self._closing:
            self._check_drained()
            return d

        def give_up() -> None:
            if not d.called:
                log.warn(
                    "shutdown: {n} commit(s) on the {listener} listener did not finish within {t} s",
                    n=len(self._commits), listener=self.listener, t=timeout,
                )
                self._drained.remove(d)
                d.callback(None)

        timer = self.clock.callLater(timeout, give_up)

        def cancel_timer(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        d.addBoth(cancel_timer)
        return d

    def _check_drained(self) -> None:
        if self._commits or self._closing or not self.draining:
            return
        waiting, self._drained = self._drained, []
        for d in waiting:
            d.callback(None)

    def has_room(self, size: int = 0) -> bool:
        """
        Whether the spool's file system can take a message (Postfix
        queue_minfree, checked at MAIL): at least C{min_free_space} and
        1.5 times C{max_message_size} free, and a declared C{size} (SIZE=)
        fits in what is free above C{min_free_space} and in half of what
        is free.  Always true with C{min_free_space} 0.  The free space
        is measured (C{free_space}, statvfs) at most once per
        L{FREE_SPACE_CACHE} seconds; a failing measurement does not
        refuse mail.
        """
        minimum = self.min_free_space
        if minimum <= 0:
            return True
        now = self.clock.seconds()
        cached = self._free
        if cached is None or not 0 <= now - cached[0] < FREE_SPACE_CACHE:
            try:
                free = int(self.free_space())
            except (OSError, ValueError, TypeError):
                log.failure("cannot measure the spool's free space")
                return True
            cached = self._free = (now, free)
        free = cached[1]
        enough = free >= minimum and free >= 1.5 * self.config.max_message_size
        fits = not size or (size <= free - minimum and size <= free / 2)
        if not (enough and fits):
            log.warn(
                "not enough free space in the spool: {free} bytes (need {minimum} and 1.5 x max_message_size"
                " {limit}; SIZE={size})",
                free=free, minimum=minimum, limit=self.config.max_message_size, size=size,
            )
            return False
        return True

    def may_send_as(self, user: str, sender: str) -> bool:
        """Whether C{user} owns envelope sender C{sender} (for L{Policy.check_sender})."""
        if self.users is not None:
            return self.users.may_send_as(user, sender, separator=self.extension_separator)
        return owns_sender(user, sender, separator=self.extension_separator)

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
