"""
The ESMTP server protocol: mailhub's own (not twisted.mail.smtp).

Owns: L{SMTPServer}, one SMTP session (RFC 5321): the connection's life
(admission, greeting, half-close, close), reading and cutting command
lines, dispatching them, sending replies (batched while pipelined
commands run), the hard error limit, feeding message bytes to the
transaction and committing it (250 only once it is durable).  The
session is composed of one object per job, each saying what it owns:

- L{mailhub.smtp.commands.Commands}: the verbs HELO ... EXPN;
- L{mailhub.smtp.tlsauth.TLSAuth}: STARTTLS (RFC 3207) and AUTH (RFC 4954);
- L{mailhub.smtp.transaction.Transaction}: open, feed, finish -> envelope or reply;
- L{mailhub.smtp.limits.Pacer}: deadlines, the minimum data rate, the soft
  error delay and flow control;
- L{mailhub.smtp.stats.CommandCounts}: what the client did, for the last log line;
- L{mailhub.smtp.proto}: the pure pieces (reply formatting, parameter
  parsing, L{DotDecoder}, L{HopCounter}, the Received header).

The factory (L{mailhub.smtp.factory.SMTPServerFactory}) sees a session
only through C{closed}, C{busy}, C{close} and C{shut_down}.

Why this module is longer than 500 lines: the input loop, the modes it
switches between (command, DATA, BDAT, discard) and the hand-over of
message bytes to the transaction and of its envelope to the commit share
one buffer and one offset; kept together, the byte path that makes the
server smuggling-proof can be read in one place.

Must not touch: the relay decision, recipient lookups, AUTH-before-MAIL
and sender ownership rules (L{policy}), passwords and SASL decoding
(L{sasl}), certificates (L{tls}), the spool's files (only through the
transaction's L{SpoolWriter}), delivery (the factory's C{enqueue}), the
global reactor (time comes from the injected clock).

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

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast
from typing import Protocol as TypingProtocol

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol, IHandshakeListener, IPushProducer
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from mailhub.eagerwrite import write_now
from mailhub.envelope import Envelope
from mailhub.maillog import mail_event
from mailhub.smtp.checks import StagedMessage, run_checks
from mailhub.smtp.commands import LINE_TOO_LONG, Commands
from mailhub.smtp.gates import Gates
from mailhub.smtp.limits import Pacer
from mailhub.smtp.policy import Session
from mailhub.smtp.proto import (
    BDAT,
    COMMAND,
    DATA,
    DISCARD,
    MAX_AUTH_LINE,
    MAX_LINE,
    MAX_MAIL_LINE,
    TOO_BIG,
    CommandError,
    Reply,
    format_reply,
    received_header,
    with_protocol,
)
from mailhub.smtp.stats import UNKNOWN, CommandCounts
from mailhub.smtp.tlsauth import TLSAuth
from mailhub.smtp.transaction import BARE_LINE_ENDING, LOCAL_ERROR, TOO_MANY_HOPS, Transaction

if TYPE_CHECKING:
    from mailhub.queue.spool import SpoolWriter
    from mailhub.smtp.factory import SMTPServerFactory

__all__ = ["SMTPServer", "REPLY_BATCH"]

log = Logger()

#: Why a message was refused at the end of its data (the reject event's reason, a metrics label).
_DATA_REASONS = {BARE_LINE_ENDING: "bare_line_ending", TOO_BIG: "too_large", LOCAL_ERROR: "local_error"}

#: Control characters never allowed in a command line (TAB is tolerated).
_BAD_COMMAND_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

#: Verbs whose lines may exceed MAX_LINE (MAIL, RCPT: MAX_MAIL_LINE; AUTH: MAX_AUTH_LINE).
_LONG_VERBS = (b"MAIL ", b"RCPT ", b"AUTH ")

NOT_IMPLEMENTED = {"ETRN", "TURN", "ATRN", "SEND", "SOML", "SAML"}

#: Replies to pipelined commands are held back and sent together (see
#: L{SMTPServer.send}) up to this many bytes at a time.
REPLY_BATCH = 4096


class _Transport(TypingProtocol):
    """
    What a session uses of its transport (TCP, or TLS over TCP): a
    connection, a consumer the session is registered on as a streaming
    producer, and a producer of the client's bytes.
    """

    def getPeer(self) -> IAddress: ...
    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...


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

    Public to its components: C{session} (the policy's view), C{factory},
    C{settings}, C{config} (the C{[server]} table), C{transport},
    C{pacer}, C{tlsauth}, C{transaction} (the open mail transaction),
    C{esmtp} (the client said EHLO), and the methods below without a
    leading underscore.
    """

    factory: SMTPServerFactory

    def __init__(self, factory: SMTPServerFactory) -> None:
        self.factory = factory
        self.settings = factory.settings
        self.config = factory.config
        # Implicit TLS (smtps): the factory is wrapped in TLS by
        # tls.implicit_tls_endpoint, so the session is encrypted from the start.
        self.session = Session(client_ip="", listener=factory.listener, tls=factory.listener == "smtps")
        # Input not yet consumed is self._buf[self._pos:]; lines are cut
        # by moving _pos, and the buffer is sliced once per _process run.
        self._buf = b""
        self._pos = 0
        self._mode = COMMAND
        self.esmtp = False
        self.transaction: Transaction | None = None
        self._held: Transaction | None = None  # a complete message whose reply waits for the error delay
        self._bdat_left = 0
        self._bdat_last = False
        self._bdat_error: Reply | None = None
        self._errors = 0
        self._closed = False
        self._eof = False  # the client shut down its sending side
        self._client_left = False  # we closed because the client half-closed or stopped reading
        self._processing = False
        self._out: list[bytes] | None = None  # replies held back while _process runs (see send)
        self._out_len = 0
        self._counted = False
        self._waiting_admission = False
        self._commands = CommandCounts()  # for the "disconnect from" line
        self.pacer = Pacer(factory.clock, self.config, self._timed_out, self._wake, self._reading)
        self.tlsauth = TLSAuth(
            self, factory.tls, factory.checker, factory.throttle, self.settings.allow_plaintext_loopback
        )
        self.commands = Commands(self)
        #: the milter conversations (mailhub.milter.session), or None: the listener has no milters
        self.milter = factory.milters.session(self) if factory.milters is not None else None
        self.gates = Gates(self)

    @property
    def _tcp(self) -> _Transport:
        """C{transport}, typed for what the session does with it."""
        assert self.transport is not None  # set by makeConnection, before connectionMade
        return cast(_Transport, self.transport)

    # -- the factory's view ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """The session closed (or is closing) its connection: it sends nothing more."""
        return self._closed

    @property
    def busy(self) -> bool:
        """A commit or an AUTH check is in flight: its reply is still to come."""
        return self.pacer.busy

    @property
    def in_transaction(self) -> bool:
        """MAIL was accepted and the message has not ended yet."""
        return self.transaction is not None

    # -- connection ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        # A proxy's connection begins once its PROXY header named the client (smtp.gates);
        # on implicit TLS the header was read beneath TLS (smtp.proxytls: proxied_by).
        self.gates.connection_made(
            getattr(self._tcp.getPeer(), "host", ""), getattr(self._tcp, "proxied_by", None)
        )

    def begin(self, client_ip: str, proxy: str | None = None) -> None:
        """Serve the client at C{client_ip} (C{proxy}: the proxy it came through)."""
        self.session.client_ip = client_ip
        verdict = self.factory.admission(self.session.client_ip)
        if isinstance(verdict, defer.Deferred):
            # Counted in the main process (several acceptor processes):
            # nothing is executed, and no greeting sent, until it answers.
            self._waiting_admission = True
            self.pacer.busy = True
            self._tcp.pauseProducing()
            verdict.addCallback(self._admitted, proxy)
            verdict.addErrback(lambda f: log.failure("connection admission", f))
            return
        self._admitted(verdict, proxy)

    def _admitted(self, limit: str, proxy: str | None = None) -> None:
        """The factory's answer about this connection: "" admitted, else the limit reached."""
        if self._closed:
            # the client left before the answer
            if not limit:
                self.factory.release(self.session.client_ip)
            return
        if limit:
            if limit not in ("max_connections", "max_connections_per_ip"):
                self.write(421, "4.3.2", f"{self.config.hostname} Service not available, try again later")
                self.close()
                return
            # Postfix's anvil warns about each connection over a limit; here
            # it is a reject event (metrics: rejected_total{reason}) saying which limit.
            mail_event(
                "reject",
                "NOQUEUE: reject: CONNECT from [{client}]: 421 4.7.0 Error: too many connections; "
                "limit={limit} listener={listener}",
                client=self.session.client_ip, code=421, enhanced="4.7.0", text="Error: too many connections",
                limit=limit, listener=self.session.listener, reason="too_many_connections",
            )
            self.write(421, "4.7.0", f"{self.config.hostname} Error: too many connections")
            self.close()
            return
        self._counted = True
        self.factory.sessions.add(self)
        waited = self._waiting_admission
        if waited:
            self._waiting_admission = False
            self.pacer.busy = False
            self._tcp.resumeProducing()
        mail_event(
            "connection",
            "connect from [{client}] listener={listener} tls={tls}" + (" proxy=[{proxy}]" if proxy else ""),
            client=self.session.client_ip, listener=self.session.listener, tls=self.session.tls, proxy=proxy,
        )
        self._tcp.registerProducer(self, True)
        self.pacer.start()
        if isinstance(self.transport, TLSMemoryBIOProtocol):
            self.pacer.handshake_started()  # implicit TLS: the greeting waits for the handshake
        self.gates.greet()  # after the connection rate limit
        if waited and not self.pacer.held:
            self.process()  # what arrived with the PROXY header

    def greet(self) -> None:
        self.write(220, "", f"{self.config.hostname} ESMTP mailhub")

    def connectionLost(self, reason: Any = None) -> None:
        # The client left (reset, or half-closed and we closed after it) rather
        # than us closing (QUIT, 421, a timeout): Postfix's "lost connection".
        lost = (not self._closed or self._client_left) and not self._commands.ended_quietly()
        tx = self.transaction
        receiving = tx is not None and self._mode in (DATA, BDAT)
        received = tx.received if tx is not None else 0
        self._closed = True
        self.gates.stop()
        self.pacer.stop()
        self.tlsauth.stop()
        self.reset_transaction()
        if self.milter is not None:
            self.milter.close()
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
        if self.gates.reading_header:
            self.gates.feed(data)
            return
        if self.pacer.handshaking:
            # Application data comes only out of a completed handshake.
            self.pacer.handshake_finished()
        self._buf = self._buf + data if self._buf else data
        if self.pacer.held:
            self._update_reading()
            return
        self.process()

    # IHandshakeListener

    def handshakeCompleted(self) -> None:
        """The TLS handshake (after STARTTLS, or on smtps) succeeded."""
        self.pacer.handshake_finished()
        self.tlsauth.handshake_completed()

    # IHalfCloseableProtocol

    def readConnectionLost(self) -> None:
        """
        The client shut down its sending side (C{shutdown(SHUT_WR)}) after,
        typically, a whole pipelined transaction and QUIT.  Everything it
        sent is still executed and answered; the connection is closed once
        the replies are written (L{process} does it when nothing more can
        be executed).  A half-received command or message is dropped.
        """
        if self._eof:
            return
        self._eof = True
        if not self._closed:
            self.process()

    def writeConnectionLost(self) -> None:
        """The client can no longer receive replies: nothing more is worth doing."""
        if not self._closed:
            self._client_left = True
            self.reset_transaction()
            self.close()

    # IPushProducer: called by the transport about its write buffer

    def pauseProducing(self) -> None:
        """The client is not reading our replies (or TLS is not ready): execute nothing more."""
        self.pacer.block_output()
        self._update_reading()

    def resumeProducing(self) -> None:
        """The write buffer drained: go on with the buffered commands."""
        if self.pacer.unblock_output():
            self.process()

    def stopProducing(self) -> None:
        """The transport is going away; L{connectionLost} follows and cleans up."""

    def close(self) -> None:
        """Send what is held back and close the connection (abort it in the middle of a TLS handshake)."""
        self.flush_output()
        self._closed = True
        self.pacer.stop()
        # Unregister first: a TLS transport does not shut down while a
        # producer is registered, and a TCP transport whose buffer drains
        # resumes a paused producer instead of closing.
        if self._counted:
            self._tcp.unregisterProducer()
        if self.pacer.handshaking:
            # A TLS layer whose handshake never completes keeps replies
            # buffered and never closes (loseConnection waits for them).
            self._tcp.abortConnection()
            return
        self._tcp.loseConnection()

    # -- deadlines and flow control (called by the pacer) ---------------------------------------------

    def _reading(self, on: bool) -> None:
        if on:
            self._tcp.resumeProducing()
        else:
            self._tcp.pauseProducing()

    def _update_reading(self) -> None:
        if self._closed or self._eof:
            return
        self.pacer.update_reading(len(self._buf) - self._pos)

    def _timed_out(self) -> None:
        if self._closed:
            return
        if self.pacer.busy and not self.pacer.output_blocked and not self.pacer.handshaking:
            # The client waits for us (a milter, a check, a commit, AUTH): it
            # is not idle, and what we wait for has its own deadline.
            self.pacer.rearm()
            return
        mail_event(
            "timeout", "timeout after {command} from [{client}]",
            client=self.session.client_ip, command=self._commands.last, listener=self.session.listener,
        )
        stuck = self.pacer.output_blocked
        self.reset_transaction()
        self.tlsauth.forget()
        if not self.pacer.handshaking:  # no reply can reach a client in the middle of a TLS handshake
            self.write(421, "4.4.2", f"{self.config.hostname} Error: timeout exceeded")
        self.close()
        if stuck:
            # The client reads nothing: the 421 and the replies before it
            # would wait forever in the write buffer.
            abort = getattr(self.transport, "abortConnection", None)
            if abort is not None:
                abort()

    def _wake(self) -> None:
        if self._closed:
            return
        held, self._held = self._held, None
        if held is not None:
            self._finish_message(held)  # the end of data waited
        else:
            self.pacer.served()  # the next command line goes first
        self.process()

    # -- replies -------------------------------------------------------------------------------

    def write(self, code: int, enhanced: str, text: str | list[str]) -> None:
        """Send one reply as given (not counted as an error)."""
        self._commands.replied(code)
        tx = self.transaction
        self.send(format_reply(code, enhanced, text, utf8=tx is not None and tx.smtputf8))

    def send(self, data: bytes) -> None:
        """
        Send reply bytes: at once (L{write_now}), except while L{process}
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
            self.flush_output(keep=True)

    def flush_output(self, keep: bool = False) -> None:
        """
        Send the replies held back by L{send}: when L{process} stops,
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
        self.write(reply.code, reply.enhanced, reply.text)
        if reply.code >= 400 and reply.code != 421:
            self._errors += 1
            if self.config.max_errors and self._errors >= self.config.max_errors:
                mail_event(
                    "too_many_errors", "too many errors after {command} from [{client}]",
                    client=self.session.client_ip, command=self._commands.last, listener=self.session.listener,
                )
                self.reset_transaction()
                self.write(421, "4.7.0", f"{self.config.hostname} Error: too many errors")
                self.close()

    # -- input loop ------------------------------------------------------------------------------

    def process(self) -> None:
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
        pacer = self.pacer
        try:
            while not self._closed and not pacer.held:
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
                    exchanging = self.tlsauth.exchanging
                    limit = MAX_AUTH_LINE if exchanging or buf[pos : pos + 5].upper() == b"AUTH " else MAX_MAIL_LINE
                    i = buf.find(b"\n", pos, pos + limit)
                    if i < 0:
                        if len(buf) - pos < limit:
                            break
                        self._line_too_long()
                        continue
                    if pacer.must_sleep(self._errors):
                        break
                    lines += 1
                    self._pos = i + 1
                    length = i + 1 - pos  # with its CRLF (or bare LF)
                    if i > pos and buf[i - 1] == 13:  # CR
                        i -= 1
                    if exchanging:
                        self.tlsauth.line(buf[pos:i])
                    elif length > MAX_LINE and buf[pos : pos + 5].upper() not in _LONG_VERBS:
                        self.reply(LINE_TOO_LONG)  # RFC 5321 4.5.3.1.4: 512 with CRLF
                    else:
                        self._command(buf[pos:i])
        finally:
            self._processing = False
            if self._pos:
                self._buf = self._buf[self._pos :]
                self._pos = 0
            self.flush_output()
        if self._closed:
            return
        if lines:
            pacer.touch()
        if self._eof and not pacer.held:
            # Everything the half-closed client sent is answered; what is
            # left cannot become a command.  loseConnection writes the
            # replies out first.
            self._client_left = True
            self.reset_transaction()
            self.close()
            return
        self._update_reading()

    def _line_too_long(self) -> None:
        """
        A line longer than its limit (12288 octets for AUTH and SASL
        responses, RFC 4954 4; 2048 for the others): the rest of it is
        read and dropped.
        """
        self._mode = DISCARD
        if not self.tlsauth.line_too_long():
            self.reply(LINE_TOO_LONG)

    def discard_input(self) -> int:
        """Drop every byte received and not yet executed (STARTTLS); how many there were."""
        pending = len(self._buf) - self._pos
        self._buf, self._pos = b"", 0
        return pending

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
        handler = self.commands.handlers.get(verb)
        self._commands.start(verb if handler is not None or verb in NOT_IMPLEMENTED else UNKNOWN)
        if handler is None:
            if verb == "PROXY" and self.factory.proxy is not None:
                self.gates.refuse_proxy()
            elif verb in NOT_IMPLEMENTED:
                self.reply(Reply(502, "5.5.1", f"Error: {verb} not implemented"))
            else:
                self.reply(Reply(500, "5.5.2", "Error: command not recognized"))
            return
        if not self.gates.hold(verb, handler, arg):  # MAIL, RCPT: after the rate limits
            self.run_command(handler, arg)

    def run_command(self, handler: Any, arg: str) -> None:
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
        self.reset_transaction()
        self.write(421, "4.3.2", f"{self.config.hostname} Service shutting down, closing transmission channel")
        self.close()

    def reset_transaction(self) -> None:
        """Forget the mail transaction (RSET, EHLO, errors, disconnect)."""
        for tx in (self.transaction, self._held):
            if tx is not None:
                tx.abort()
        self.transaction = self._held = None
        if self.milter is not None:
            self.milter.reset()

    def after_milter(self, verdict: defer.Deferred[Reply | None], go: Callable[[], None]) -> None:
        """
        Read nothing more until the milters answered a command: a refusal
        is the command's reply, C{None} runs C{go} (the command's own end).
        """
        self.pacer.busy = True

        def answered(refusal: Reply | None) -> None:
            self.pacer.busy = False
            if self._closed:
                return
            if refusal is None:
                go()
            else:
                self.reply(refusal)
                if refusal.code == 421:
                    self.close()
            self.process()

        def broken(failure: Any) -> None:
            log.failure("milter stage failed", failure)
            answered(LOCAL_ERROR)

        verdict.addCallbacks(answered, broken)

    def reset_session(self) -> None:
        """
        Forget everything the client told us: the transaction, HELO/EHLO
        and the authenticated user.  The one place to call when the
        channel changes under the client (STARTTLS, RFC 3207 4.2).
        """
        self.reset_transaction()
        self.esmtp = False
        self.tlsauth.forget()
        self.session.helo = None
        self.session.authenticated_user = None

    # -- message data ----------------------------------------------------------------------------------

    def protocol_name(self, tx: Transaction) -> str:
        """The C{with} word of the Received header (ESMTPSA, UTF8SMTPS, ...)."""
        return with_protocol(self.esmtp, self.session.tls, bool(self.session.authenticated_user), tx.smtputf8)

    def open_message(self, tx: Transaction) -> Reply | None:
        """Create the spool file with our Received header; a 451 reply (and no transaction) on trouble."""
        session, factory = self.session, self.factory
        one = tx.accepted[0] if len(tx.accepted) == 1 else None
        user = session.authenticated_user

        def header(queue_id: str) -> bytes:
            return received_header(
                session.helo or "", session.client_ip, self.config.hostname,
                self.protocol_name(tx), queue_id, one, factory.clock.seconds(),
                auth_user=user if self.settings.received_auth_user else None,
                hide_client=bool(user) and self.config.hide_client_ip,
            )

        trouble = tx.open(factory.spool, header, self.config.max_message_size, self.config.max_hops)
        if trouble is not None:
            self.reset_transaction()
        return trouble

    def start_data(self) -> None:
        """DATA was accepted: what follows is message content up to CRLF . CRLF."""
        assert self.transaction is not None
        self.transaction.start_data()
        self._mode = DATA
        self.write(354, "", "End data with <CR><LF>.<CR><LF>")

    def start_bdat(self, count: int, last: bool, error: Reply | None) -> None:
        """BDAT: the next C{count} octets are content (only read and dropped with an C{error})."""
        self._bdat_left = count
        self._bdat_last = last
        self._bdat_error = error
        self._mode = BDAT
        if count == 0:
            self._bdat_chunk(b"")

    def _data_chunk(self, data: bytes) -> None:
        tx = self.transaction
        assert tx is not None
        self.pacer.extend(len(data))
        rest = tx.feed(data)
        if rest is not None:
            self._buf, self._pos = rest + self._buf[self._pos :], 0
            self._mode = COMMAND
            self._end_of_message(tx)

    def _bdat_chunk(self, data: bytes) -> None:
        self._bdat_left -= len(data)
        self.pacer.extend(len(data))
        tx = self.transaction
        if tx is not None:
            tx.feed_chunk(data, write=self._bdat_error is None)
        if self._bdat_left:
            return
        self._mode = COMMAND
        if self._bdat_error is not None:
            self.reply(self._bdat_error)
        elif tx is not None and (tx.error is not None or self._bdat_last):
            self._end_of_message(tx)
        elif tx is not None:
            self.reply(Reply(250, "2.0.0", f"Ok: {tx.size} octets received"))

    def _end_of_message(self, tx: Transaction) -> None:
        """The message is complete (after the error delay, if one is due): see L{_finish_message}."""
        self.transaction = None
        self._commands.end_of_message()
        self.pacer.touch()
        if self.pacer.must_sleep(self._errors):
            self._held = tx
            return
        self._finish_message(tx)

    def _finish_message(self, tx: Transaction) -> None:
        """Reject the message, or commit it and answer 250 only once it is durable."""
        session = self.session
        outcome = tx.finish(
            self.factory.clock.seconds(),
            {
                "helo": session.helo,
                "addr": session.client_ip,
                "protocol": self.protocol_name(tx),
                "user": session.authenticated_user or "",
                "listener": session.listener,
            },
        )
        if isinstance(outcome, Reply):
            if outcome is TOO_MANY_HOPS:
                mail_event(
                    "reject",
                    "NOQUEUE: reject: DATA from [{client}]: {code} {enhanced} {text}; hops={hops} from=<{sender}>",
                    client=session.client_ip, code=outcome.code, enhanced=outcome.enhanced,
                    text=outcome.text, hops=tx.hops.count, sender=tx.sender, reason="too_many_hops",
                )
            else:
                # the message's content was refused: the log says why, as for MAIL and RCPT
                mail_event(
                    "reject",
                    "NOQUEUE: reject: DATA from [{client}]: {code} {enhanced} {text}; size={size} from=<{sender}>",
                    client=session.client_ip, code=outcome.code, enhanced=outcome.enhanced,
                    text=outcome.text, size=tx.size, sender=tx.sender, reason=_DATA_REASONS.get(outcome, "other"),
                )
            self.reply(outcome)
            return
        writer = tx.writer
        assert writer is not None
        self.pacer.busy = True
        checks = self.factory.checks
        d: defer.Deferred[Any]
        if not checks:
            d = self._commit(outcome, writer, {})
        else:
            staged = StagedMessage(outcome, writer, trusted=self.factory.policy.may_relay(session), session=self)
            d = run_checks(checks, staged)
            d.addCallback(self._checked, staged)
        self.factory.track_commit(self, d)

    def _checked(self, verdict: Reply | None, staged: StagedMessage) -> defer.Deferred[None] | None:
        """The end-of-data checks answered: refuse the message, or commit it as they left it."""
        envelope = staged.envelope
        if self._closed:
            staged.writer.abort()  # nobody is told 250 any more: the client will send it again
            return None
        if verdict is not None:
            staged.writer.abort()
            self.pacer.busy = False
            mail_event(
                "reject",
                "{queue_id}: reject: END-OF-MESSAGE from [{client}]: {code} {enhanced} {text}; from=<{sender}>",
                queue_id=envelope.queue_id, client=envelope.client["addr"], code=verdict.code,
                enhanced=verdict.enhanced, text=verdict.text, sender=envelope.sender, reason="message_check",
            )
            self.reply(verdict)
            if verdict.code == 421:
                self.close()  # as for a 421 at any other stage: the service closes the channel
            self.process()
            return None
        if staged.discard:
            staged.writer.abort()
            self.pacer.busy = False
            mail_event(
                "discard", "{queue_id}: discard: END-OF-MESSAGE from [{client}]; from=<{sender}>",
                queue_id=envelope.queue_id, client=envelope.client["addr"], sender=envelope.sender,
            )
            self.reply(Reply(250, "2.0.0", f"Ok: queued as {envelope.queue_id}"))
            self.process()
            return None
        envelope.esmtp["size"] = staged.writer.size
        return self._commit(envelope, staged.writer, staged.log_fields)

    def _commit(self, envelope: Envelope, writer: SpoolWriter, log_fields: dict[str, str]) -> defer.Deferred[None]:
        """
        Commit through the factory's C{committer} (the spool, or straight
        into the Maildirs: L{mailhub.queue.commit}): 250 once durable, 451
        on any failure.
        """
        d = defer.maybeDeferred(self.factory.committer.commit, envelope, writer, log_fields)
        d.addCallbacks(self._committed, self._commit_failed, callbackArgs=(envelope,), errbackArgs=(envelope,))
        return d

    def _committed(self, _: object, envelope: Envelope) -> None:
        self.pacer.busy = False
        self._errors = 0  # Postfix: the hard limit counts errors "without delivering mail"
        self.reply(Reply(250, "2.0.0", f"Ok: queued as {envelope.queue_id}"))
        self.process()

    def _commit_failed(self, failure: Any, envelope: Envelope) -> None:
        self.pacer.busy = False
        log.failure("commit failed for {queue_id}", failure, queue_id=envelope.queue_id)
        self.reply(LOCAL_ERROR)
        self.process()
