"""
The outbound ESMTP client protocol: one connection to one remote MTA.

Owns: the client side of the SMTP conversation -- reading the greeting,
EHLO (HELO fallback), STARTTLS, AUTH, and transactions (MAIL, RCPT, DATA,
RSET, QUIT) with PIPELINING -- its timeouts, and turning every reply into
data: one L{Outcome} per recipient, or a L{SessionError} for the connection
as a whole.  L{connect} sets a session up; L{SMTPConnection} is what the
relay agent holds.

Why one module of this size: it is one state machine.  Replies are read
from bytes with hard bounds (L{MAX_LINE}, L{MAX_LINES},
L{MAX_EARLY_REPLIES}: a hostile server cannot make us buffer without
limit) and handed in order to the waiters the session set-up and the
transactions register; the timers, the TLS state and the connection's loss
are all one object's state.  What could be said apart is: the reply and
error types (L{mailhub.relay.reply}), the DATA stream and its dot-stuffing
(L{mailhub.relay.dotstuff}), the MAIL/RCPT parameters, SMTPUTF8 and
8BITMIME decisions (L{mailhub.relay.prepare}) and the TLS context and
failure texts (L{mailhub.relay.tls}).

Must not touch: routing (which host, which MX, in which order:
L{mailhub.relay.agent}), retry decisions (the scheduler), the spool (the
message file is only read), configuration files, and the global reactor
(time and connections come in through the injected reactor and endpoint).
"""

from __future__ import annotations

import base64
import datetime
from dataclasses import dataclass
from typing import Any, cast

from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IHandshakeListener, IReactorTime, IStreamClientEndpoint, ITLSTransport
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailhub.eagerwrite import write_now
from mailhub.envelope import Envelope, Outcome, Recipient
from mailhub.queue.queuefile import QueueFileError, open_message
from mailhub.relay.dane import tlsa_match
from mailhub.relay.dotstuff import BodyProducer
from mailhub.relay.prepare import Prepared, prepare
from mailhub.relay.reply import LOCAL_CODE, ConnectionBroken, SessionError, SMTPReply, parse_reply
from mailhub.relay.tls import client_creator, connect_reason, tls_failure_text

__all__ = [
    "TLS_NONE",
    "TLS_MAY",
    "TLS_ENCRYPT",
    "TLS_VERIFY",
    "MAX_LINE",
    "MAX_LINES",
    "MAX_EARLY_REPLIES",
    "ClientOptions",
    "SMTPConnection",
    "SMTPClientProtocol",
    "SMTPClientFactory",
    "connect",
]

log = Logger()

TLS_NONE, TLS_MAY, TLS_ENCRYPT, TLS_VERIFY = "none", "may", "encrypt", "verify"
_TLS_LEVELS = (TLS_NONE, TLS_MAY, TLS_ENCRYPT, TLS_VERIFY)

#: Longest reply line we accept (RFC 5321 allows 512; Postfix reads up to
#: line_length_limit = 2048).  Longer, or no line end within it: the
#: connection is dropped as a protocol error.
MAX_LINE = 4096
#: Most lines in one multi-line reply (an EHLO reply has a dozen).
MAX_LINES = 200
#: Replies a server may send that we did not ask for yet before we give up.
MAX_EARLY_REPLIES = 16


@dataclass(frozen=True)
class ClientOptions:
    """
    How to talk to one destination.  Names and defaults follow Postfix's
    smtp(8) parameters (noted per field).
    """

    helo_name: str  # our EHLO name (smtp_helo_name)
    tls: str = TLS_MAY  # smtp_tls_security_level
    tls_hostname: str | None = None  # name checked under "verify" (default: remote_name)
    tls_ca_file: str | None = None  # trust roots for "verify" (None: platform store)
    auth: tuple[str, str] | None = None  # (user, password); only ever sent over TLS
    connect_timeout: float = 30.0  # smtp_connect_timeout
    greeting_timeout: float = 300.0  # smtp_helo_timeout (greeting, EHLO, HELO)
    command_timeout: float = 300.0  # smtp_mail_timeout / smtp_rcpt_timeout / starttls / auth / rset / quit
    data_init_timeout: float = 120.0  # smtp_data_init_timeout
    data_xfer_timeout: float = 180.0  # smtp_data_xfer_timeout, per write progress
    data_done_timeout: float = 600.0  # smtp_data_done_timeout
    # What a verification would say is recorded, not enforced (MTA-STS testing).
    tls_observe: bool = False
    # DANE (mailhub.relay.dane): the chain must match one of these TLSA records;
    # DANE-TA also checks the leaf's name against dane_names.
    dane_tlsa: tuple[Any, ...] = ()
    dane_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.tls not in _TLS_LEVELS:
            raise ValueError(f"tls must be one of {_TLS_LEVELS}, not {self.tls!r}")


@dataclass
class _Waiter:
    deferred: Deferred
    timeout: float
    what: str


@implementer(IHandshakeListener)
class SMTPClientProtocol(Protocol):
    """
    The byte-level client.  Replies go, in order, to the L{_Waiter}s
    registered by L{_expect}; one timer covers the oldest waiter.  The
    session set-up and each transaction are coroutines over those waiters.
    A waiter's Deferred fires with an L{SMTPReply} or a L{ConnectionBroken}, never
    errbacks, so unawaited pipelined waiters cannot leak unhandled errors.
    """

    clock: IReactorTime
    options: ClientOptions
    remote_name: str
    remote_mta: str
    factory: SMTPClientFactory

    def __init__(self) -> None:
        self._buf = bytearray()
        self._lines: list[tuple[int, str]] = []
        self._waiters: list[_Waiter] = []
        self._early: list[SMTPReply] = []
        self._timer: Any = None
        self._xfer_timer: Any = None
        self._closed = False
        self._lost = False
        self._tls_pending = False
        self._handshake_done = False
        self._verify_error: tuple[int, int] | None = None
        self._failure: ConnectionBroken | None = None
        self._producer: BodyProducer | None = None
        self._busy = False
        self.extensions: dict[str, str] = {}
        self.tls = False
        self.tls_version = ""
        self.tls_cipher = ""
        self.tls_pkix_error: str | None = "not checked"
        self.tls_dane: str | None = None
        self._creator: Any = None
        self.usable = False
        self.connection: SMTPConnection | None = None

    @property
    def _tcp(self) -> ITLSTransport:
        """C{transport}, typed: a TCP connection that can start TLS."""
        assert self.transport is not None  # set by makeConnection, before connectionMade
        return cast(ITLSTransport, self.transport)

    # -- connection -----------------------------------------------------------

    def connectionMade(self) -> None:
        if not self.factory.remote_ip:
            peer = getattr(self._tcp.getPeer(), "host", "")
            self.remote_mta = f"{self.remote_name}[{peer}]:{self.factory.port}"
        d = Deferred.fromCoroutine(self._session())
        d.addBoth(self._session_done)

    def handshakeCompleted(self) -> None:
        self._handshake_done = True
        log.debug("TLS handshake completed with {mta}", mta=self.remote_mta)

    def _in_handshake(self) -> bool:
        """STARTTLS was accepted and the TLS handshake has not completed."""
        return self._tls_pending and not self._handshake_done

    def _record_verify_error(self, errno: int, depth: int) -> None:
        if self._verify_error is None:
            self._verify_error = (errno, depth)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._lost:
            return
        self._lost = True
        self._closed = True
        self.usable = False
        self._cancel_timers()
        if self._failure is None:
            what = self._waiters[0].what if self._waiters else "in idle state"
            if self._producer is not None and not self._producer.finished:
                what = "sending message content"
            text = f"lost connection with {self.remote_mta} while {what}"
            tls_failed = self._tls_pending and not self.tls
            err = reason.value if reason is not None else None
            if tls_failed and (
                self._in_handshake() or self._verify_error is not None
                or isinstance(err, (VerificationError, CertificateError, SSL.Error))
            ):
                text = tls_failure_text(self.remote_name, self.remote_mta, err, self._verify_error)
            self._failure = ConnectionBroken(text, "4.7.5" if tls_failed else "4.4.2", tls_failed=tls_failed)
        if self._producer is not None:
            self._producer.fail(self._failure)
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.deferred.callback(self._failure)

    def _abort(self, text: str, enhanced: str = "4.4.2", tls_failed: bool = False) -> None:
        """Drop the connection at once; every waiter gets C{text}."""
        if self._failure is None:
            self._failure = ConnectionBroken(text, enhanced, tls_failed)
        self.usable = False
        if not self._closed:
            self._closed = True
            self._tcp.abortConnection()
            # Some transports (StringTransport) do not call connectionLost.
            self.connectionLost(Failure(self._failure))

    def _cancel_timers(self) -> None:
        for t in (self._timer, self._xfer_timer):
            if t is not None and t.active():
                t.cancel()
        self._timer = self._xfer_timer = None

    # -- replies ----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        while not self._closed:
            i = self._buf.find(b"\n")
            if i < 0:
                if len(self._buf) > MAX_LINE:
                    self._abort(f"reply line from {self.remote_mta} too long", "4.5.0")
                return
            if i > MAX_LINE:
                self._abort(f"reply line from {self.remote_mta} too long", "4.5.0")
                return
            raw = bytes(self._buf[:i]).rstrip(b"\r")
            del self._buf[: i + 1]
            text = raw.decode("utf-8", "replace")
            if len(text) < 3 or not text[:3].isdigit() or (len(text) > 3 and text[3] not in " -"):
                self._abort(f"malformed reply from {self.remote_mta}: {text[:100]!r}", "4.5.0")
                return
            self._lines.append((int(text[:3]), text[4:]))
            if len(self._lines) > MAX_LINES:
                self._abort(f"reply from {self.remote_mta} has too many lines", "4.5.0")
                return
            if len(text) > 3 and text[3] == "-":
                continue
            reply = parse_reply(self._lines)
            self._lines = []
            self._dispatch(reply)

    def _dispatch(self, reply: SMTPReply) -> None:
        if not self._waiters:
            self._early.append(reply)
            if len(self._early) > MAX_EARLY_REPLIES:
                self._abort(f"too many unexpected replies from {self.remote_mta}", "4.5.0")
            return
        w = self._waiters.pop(0)
        self._arm()
        w.deferred.callback(reply)

    def _expect(self, timeout: float, what: str) -> Deferred:
        """A Deferred for the next reply not yet claimed."""
        d: Deferred = Deferred()
        if self._closed:
            d.callback(self._failure or ConnectionBroken(f"lost connection with {self.remote_mta} while {what}"))
            return d
        if self._early:
            d.callback(self._early.pop(0))
            return d
        self._waiters.append(_Waiter(d, timeout, what))
        if len(self._waiters) == 1:
            self._arm()
        return d

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._waiters:
            w = self._waiters[0]
            self._timer = self.clock.callLater(w.timeout, self._timed_out, w.what)

    def _timed_out(self, what: str) -> None:
        self._timer = None
        if self._in_handshake():
            what = "performing the TLS handshake"
        self._abort(f"conversation with {self.remote_mta} timed out while {what}")

    def _arm_xfer(self) -> None:
        if self._xfer_timer is not None and self._xfer_timer.active():
            self._xfer_timer.cancel()
        self._xfer_timer = self.clock.callLater(
            self.options.data_xfer_timeout, self._timed_out, "sending message content"
        )

    def _write(self, *commands: str) -> None:
        if not self._closed:
            write_now(self.transport, b"".join(c.encode("utf-8") + b"\r\n" for c in commands))

    async def _command(self, command: str, timeout: float, what: str) -> SMTPReply:
        self._write(command)
        return await self._reply(self._expect(timeout, what))

    async def _reply(self, d: Deferred) -> SMTPReply:
        r = await d
        if isinstance(r, ConnectionBroken):
            raise r
        if r.code == 421:
            # The server is closing the session: whatever we were doing on
            # this connection is over (RFC 5321 3.8).
            raise ConnectionBroken(f"host {self.remote_mta} said: {r.said}", r.enhanced, code=421)
        return r

    # -- session set-up ---------------------------------------------------------------

    def _fail(self, reply: SMTPReply, what: str, **kw: Any) -> SessionError:
        return SessionError(
            reply.code,
            reply.enhanced,
            f"host {self.remote_mta} said: {reply.said} (in reply to {what})",
            permanent=reply.code // 100 == 5,
            remote_mta=self.remote_mta,
            **kw,
        )

    def _local_error(self, enhanced: str, text: str, permanent: bool = False, **kw: Any) -> SessionError:
        code = LOCAL_CODE if permanent else LOCAL_CODE
        return SessionError(code, enhanced, text, permanent, self.remote_mta, **kw)

    async def _session(self) -> SMTPConnection:
        o = self.options
        greeting = await self._reply(self._expect(o.greeting_timeout, "receiving the initial server greeting"))
        if greeting.code != 220:
            raise self._fail(greeting, "initial server greeting")
        await self._hello()
        if o.tls != TLS_NONE:
            if "STARTTLS" in self.extensions:
                await self._starttls()
            elif o.tls in (TLS_ENCRYPT, TLS_VERIFY):
                raise self._local_error("4.7.4", f"TLS is required, but was not offered by host {self.remote_mta}")
        if o.auth is not None:
            await self._auth()
        self.usable = True
        self.connection = SMTPConnection(self)
        return self.connection

    async def _hello(self) -> None:
        o = self.options
        reply = await self._command(f"EHLO {o.helo_name}", o.greeting_timeout, "performing the EHLO handshake")
        if reply.code // 100 == 2:
            self.extensions = {}
            for line in reply.lines[1:]:
                word, _, params = line.strip().partition(" ")
                key, eq, old = word.partition("=")  # old-style "AUTH=LOGIN"
                key = key.upper()
                if eq:
                    self.extensions.setdefault(key, (old + " " + params).strip())
                elif key:
                    self.extensions[key] = params.strip()
            return
        if reply.code // 100 != 5:
            raise self._fail(reply, "EHLO")
        reply = await self._command(f"HELO {o.helo_name}", o.greeting_timeout, "performing the HELO handshake")
        if reply.code // 100 != 2:
            raise self._fail(reply, "HELO")
        self.extensions = {}

    async def _starttls(self) -> None:
        o = self.options
        reply = await self._command("STARTTLS", o.command_timeout, "sending STARTTLS")
        if reply.code != 220:
            if o.tls == TLS_MAY:
                # Postfix smtp_proto.c: "Else try to continue in plain-text mode."
                log.info(
                    "{mta} refused STARTTLS ({code} {text}); continuing without TLS",
                    mta=self.remote_mta, code=reply.code, text=reply.text,
                )
                return
            raise SessionError(
                LOCAL_CODE, "4.7.4",
                f"TLS is required, but host {self.remote_mta} refused to start TLS: {reply.said}",
                False, self.remote_mta,
            )
        if self._buf or self._early or self._lines:
            # Plain-text bytes after the 220 would be read as if they came
            # through TLS (the CVE-2011-0411 class of injection).
            self._abort(f"host {self.remote_mta} sent data after its STARTTLS reply", "4.7.0", tls_failed=True)
            raise self._local_error("4.7.0", self._failure.text if self._failure else "", tls_failed=True)
        try:
            creator = self._tls_options()
        except Exception as e:
            raise self._local_error("4.7.5", f"cannot set up TLS for {self.remote_mta}: {e}", tls_failed=True)
        self.extensions = {}
        self._tls_pending = True
        self._creator = creator
        self._tcp.startTLS(creator)
        try:
            await self._hello()
        except ConnectionBroken as e:
            # The handshake runs when the EHLO after STARTTLS is written; a
            # failure there is worded by connectionLost (tls_failure_text).
            raise SessionError(
                e.code, e.enhanced if e.code else "4.7.5", e.text, False, self.remote_mta, tls_failed=True
            )
        self._tls_established()
        log.info("TLS connection established to {mta} (tls={tls_level} {version} {cipher})", mta=self.remote_mta,
                 tls_level=o.tls, version=self.tls_version, cipher=self.tls_cipher)

    def _tls_established(self) -> None:
        """After the handshake: what was negotiated, and the DANE check (before any mail is sent)."""
        o = self.options
        ssl_conn = getattr(self._creator, "connection", None)
        if ssl_conn is not None:
            self.tls_version = ssl_conn.get_protocol_version_name() or ""
            self.tls_cipher = ssl_conn.get_cipher_name() or ""
        self.tls_pkix_error = None if o.tls == TLS_VERIFY else getattr(self._creator, "pkix_error", "not checked")
        if o.dane_tlsa:
            chain = [c.to_cryptography() for c in (ssl_conn.get_peer_cert_chain() or [])] if ssl_conn is not None else []
            now = datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.UTC)
            names = o.dane_names or (o.tls_hostname or self.remote_name,)
            self.tls_dane = tlsa_match(chain, o.dane_tlsa, names, now)
            if self.tls_dane is None:
                raise self._local_error(
                    "4.7.5", f"TLS: certificate of {self.remote_name} does not match its TLSA records",
                    tls_failed=True)
        self.tls = True
        self._tls_pending = False

    def _tls_options(self) -> Any:
        o = self.options
        return client_creator(
            o.tls == TLS_VERIFY, o.tls_ca_file, o.tls_hostname or self.remote_name, self._record_verify_error,
            observe=o.tls_observe,
        )

    async def _auth(self) -> None:
        o = self.options
        assert o.auth is not None
        user, password = o.auth
        if not self.tls:
            log.warn("not sending credentials to {mta} without TLS", mta=self.remote_mta)
            raise self._local_error(
                "4.7.4", f"refusing to authenticate to {self.remote_mta} without TLS"
            )
        mechs = self.extensions.get("AUTH", "").upper().split()
        b64 = lambda s: base64.b64encode(s.encode("utf-8")).decode("ascii")  # noqa: E731
        if "PLAIN" in mechs:
            reply = await self._command(
                "AUTH PLAIN " + b64(f"\0{user}\0{password}"), o.command_timeout, "sending AUTH"
            )
        elif "LOGIN" in mechs:
            reply = await self._command("AUTH LOGIN", o.command_timeout, "sending AUTH")
            if reply.code == 334:
                reply = await self._command(b64(user), o.command_timeout, "sending AUTH")
            if reply.code == 334:
                reply = await self._command(b64(password), o.command_timeout, "sending AUTH")
        else:
            raise self._local_error(
                "4.7.0", f"host {self.remote_mta} offers no supported SASL mechanism (AUTH {' '.join(mechs)})"
            )
        if reply.code == 235:
            return
        if reply.code == 535:
            raise SessionError(
                535, "5.7.8",
                f"SASL authentication failed; server {self.remote_mta} said: {reply.said}",
                True, self.remote_mta,
            )
        if reply.code == 334:
            self._write("*")  # cancel the exchange (RFC 4954 4)
            raise self._local_error("4.7.0", f"unexpected SASL challenge from {self.remote_mta}")
        raise self._fail(reply, "AUTH")

    def _session_done(self, result: Any) -> None:
        ready = self.factory.ready
        if isinstance(result, Failure):
            err = result.value
            if isinstance(err, ConnectionBroken):
                err = SessionError(
                    err.code, err.enhanced, err.text, False, self.remote_mta,
                    tls_failed=err.tls_failed or self._tls_pending,
                )
            elif not isinstance(err, SessionError):
                log.failure("smtp client session to {mta} failed", result, mta=self.remote_mta)
                err = self._local_error("4.3.0", f"internal error talking to {self.remote_mta}: {err}")
            self.usable = False
            if not self._closed:
                # A polite end for a server that rejected us; no wait.
                self._write("QUIT")
                self._closed = True
                self._cancel_timers()
                self._tcp.loseConnection()
            if not ready.called:
                ready.errback(err)
            return
        if not ready.called:
            ready.callback(result)

    # -- transactions ----------------------------------------------------------------

    def _outcome(self, rcpt: Recipient, reply: SMTPReply, what: str) -> Outcome:
        text = f"host {self.remote_mta} said: {reply.said} (in reply to {what})"
        cls = reply.code // 100
        if cls == 2:  # NOTIFY etc. went with the RCPT when the peer offered DSN
            return Outcome.delivered(rcpt.address, text, self.remote_mta, dsn_passed="DSN" in self.extensions)
        if cls == 5:
            return Outcome.permanent(rcpt.address, text, reply.code, reply.enhanced, self.remote_mta)
        status = reply.enhanced if cls == 4 else "4.5.0"
        return Outcome.temporary(rcpt.address, text, reply.code, status, self.remote_mta)


    async def _transaction(
        self, envelope: Envelope, recipients: list[Recipient], message_path: str
    ) -> list[Outcome]:
        o = self.options
        mta = self.remote_mta
        outcomes: dict[int, Outcome] = {}

        if not recipients:
            return []
        try:
            f = open_message(message_path)
        except (OSError, QueueFileError) as e:
            unreadable = f"cannot read queue file: {e}"
            return [Outcome.temporary(r.address, unreadable, LOCAL_CODE, "4.3.0", mta) for r in recipients]
        with f:
            prepared = prepare(f, envelope, recipients, self.extensions, mta)
            if not isinstance(prepared, Prepared):
                return prepared
            mail, rcpts, body = prepared.mail, prepared.rcpts, prepared.body
            try:
                # Outcomes are recorded as replies arrive, so a connection
                # lost half way keeps the RCPT rejections already given.
                accepted: list[int] = []
                data_r: SMTPReply | None = None

                def on_mail(mail_r: SMTPReply) -> bool:
                    if mail_r.code // 100 == 2:
                        return True
                    for i, r in enumerate(recipients):
                        outcomes[i] = self._outcome(r, mail_r, "MAIL FROM command")
                    return False

                def on_rcpt(i: int, rr: SMTPReply) -> None:
                    if rr.code // 100 == 2:
                        accepted.append(i)
                    else:
                        outcomes[i] = self._outcome(recipients[i], rr, "RCPT TO command")

                if "PIPELINING" in self.extensions:
                    mail_w = self._expect(o.command_timeout, "sending MAIL FROM")
                    rcpt_ws = [self._expect(o.command_timeout, "sending RCPT TO") for _ in rcpts]
                    data_w = self._expect(o.data_init_timeout, "sending DATA command")
                    self._write(mail, *rcpts, "DATA")
                    mail_ok = on_mail(await self._reply(mail_w))
                    for i, w in enumerate(rcpt_ws):
                        rr = await self._reply(w)
                        if mail_ok:
                            on_rcpt(i, rr)
                    data_r = await self._reply(data_w)
                else:
                    if on_mail(await self._command(mail, o.command_timeout, "sending MAIL FROM")):
                        for i, cmd in enumerate(rcpts):
                            on_rcpt(i, await self._command(cmd, o.command_timeout, "sending RCPT TO"))
                        if accepted:
                            data_r = await self._command("DATA", o.data_init_timeout, "sending DATA command")

                if not accepted or data_r is None or data_r.code != 354:
                    for i in accepted:
                        assert data_r is not None
                        if data_r.code // 100 in (4, 5):
                            outcomes[i] = self._outcome(recipients[i], data_r, "DATA command")
                        else:  # a 2xx to DATA accepts nothing: protocol error
                            outcomes[i] = Outcome.temporary(
                                recipients[i].address,
                                f"host {mta} said: {data_r.said} (unexpected reply to DATA command)",
                                LOCAL_CODE, "4.5.0", mta)
                    if data_r is not None and data_r.code == 354:
                        # Pipelined DATA accepted with no recipient: end it
                        # empty, as RFC 2920 3.1 requires.
                        self._write(".")
                        await self._reply(self._expect(o.data_done_timeout, "sending end of data"))
                    rset = await self._command("RSET", o.command_timeout, "sending RSET")
                    if rset.code // 100 != 2:
                        self.usable = False
                    return [outcomes[i] for i in range(len(recipients))]

                self._producer = BodyProducer(
                    self.transport, self.clock, body, progress=self._arm_xfer,
                    read_error=lambda e: self._abort(f"error reading queue file: {e}", "4.3.0"),
                    lost=lambda: ConnectionBroken(f"lost connection with {mta} while sending message content"),
                )
                self._producer.start()
                broken = await self._producer.done
                if broken is not None:
                    raise broken
                if self._xfer_timer is not None and self._xfer_timer.active():
                    self._xfer_timer.cancel()
                self._xfer_timer = None
                end = await self._reply(self._expect(
                    o.data_done_timeout, "sending end of data -- message may be sent more than once"))
                for i in accepted:
                    outcomes[i] = self._outcome(recipients[i], end, "end of DATA command")
                return [outcomes[i] for i in range(len(recipients))]
            except ConnectionBroken as e:
                self.usable = False
                self._abort(e.text, e.enhanced)
                return [
                    outcomes.get(i) or Outcome.temporary(r.address, e.text, e.code, e.enhanced, mta)
                    for i, r in enumerate(recipients)
                ]
            finally:
                self._producer = None

    def _begin(self) -> bool:
        if self._busy:
            raise RuntimeError("another command is in progress on this connection")
        self._busy = True
        return True

    def send(self, envelope: Envelope, recipients: list[Recipient], message_path: str) -> Deferred:
        if not self.usable or self._closed:
            mta = self.remote_mta
            text = (self._failure.text if self._failure else f"connection to {mta} is not usable")
            return succeed([Outcome.temporary(r.address, text, LOCAL_CODE, "4.4.2", mta) for r in recipients])
        self._begin()

        def done(result: Any) -> Any:
            self._busy = False
            return result

        return Deferred.fromCoroutine(self._transaction(envelope, recipients, message_path)).addBoth(done)

    def reset(self) -> Deferred:
        if not self.usable or self._closed:
            self.usable = False
            return succeed(None)
        self._begin()

        async def rset() -> None:
            try:
                r = await self._command("RSET", self.options.command_timeout, "sending RSET")
            except ConnectionBroken as e:
                self._abort(e.text, e.enhanced)
                return
            if r.code // 100 != 2:
                self.usable = False
                self._abort(f"host {self.remote_mta} refused RSET: {r.said}")

        def done(result: Any) -> Any:
            self._busy = False
            return result

        return Deferred.fromCoroutine(rset()).addBoth(done)

    def quit(self) -> Deferred:
        self.usable = False
        if self._closed:
            return succeed(None)

        async def quit_() -> None:
            try:
                await self._command("QUIT", self.options.command_timeout, "sending QUIT")
            except ConnectionBroken:
                return
            if not self._closed:
                self._closed = True
                self._cancel_timers()
                self._tcp.loseConnection()

        return Deferred.fromCoroutine(quit_())


class SMTPConnection:
    """
    An established session (greeting, EHLO, STARTTLS, AUTH done), handed to
    the relay agent.  One transaction at a time; L{usable} says whether another
    message may follow (after L{reset}).
    """

    def __init__(self, proto: SMTPClientProtocol) -> None:
        self._proto = proto

    @property
    def remote_mta(self) -> str:
        return self._proto.remote_mta

    @property
    def extensions(self) -> dict[str, str]:
        return self._proto.extensions

    @property
    def tls(self) -> bool:
        return self._proto.tls

    @property
    def usable(self) -> bool:
        return self._proto.usable and not self._proto._closed

    @property
    def tls_info(self) -> dict[str, Any]:
        """
        How the session is protected: C{version} and C{cipher} ("" in plain
        text), C{pkix_error} (None when the chain was verified or, observed,
        would have been), C{dane} (the matching TLSA record, or None).
        """
        p = self._proto
        return {"version": p.tls_version, "cipher": p.tls_cipher, "pkix_error": p.tls_pkix_error, "dane": p.tls_dane}

    def send(self, envelope: Envelope, recipients: list[Recipient], message_path: str) -> Deferred:
        """
        One transaction: MAIL, RCPT for each of C{recipients}, DATA with the
        bytes of C{message_path}.  Fires with one L{Outcome} per recipient,
        in order; never errbacks for SMTP or connection trouble (a broken
        connection gives temporary outcomes and L{usable} becomes False).
        """
        return self._proto.send(envelope, recipients, message_path)

    def reset(self) -> Deferred:
        """RSET before reusing the connection; a failure makes it unusable."""
        return self._proto.reset()

    def quit(self) -> Deferred:
        """QUIT and close; always fires with None."""
        return self._proto.quit()


class SMTPClientFactory(ClientFactory[SMTPClientProtocol]):
    """
    Builds the one L{SMTPClientProtocol} of one connection.  C{ready} fires
    with the L{SMTPConnection} once the session is set up, or errbacks with
    L{SessionError}.
    """

    protocol = SMTPClientProtocol
    noisy = False  # no "Starting factory" line for every connection (mailhub/loglevel.py)

    def __init__(
        self, clock: IReactorTime, options: ClientOptions, remote_name: str, remote_ip: str = "", port: int = 25
    ) -> None:
        self.clock = clock
        self.options = options
        self.remote_name = remote_name
        self.remote_ip = remote_ip
        self.port = port
        self.remote_mta = f"{remote_name}[{remote_ip}]:{port}"
        self.ready: Deferred = Deferred()

    def buildProtocol(self, addr: Any) -> SMTPClientProtocol:
        p = self.protocol()
        p.factory = self
        p.clock = self.clock
        p.options = self.options
        p.remote_name = self.remote_name
        p.remote_mta = self.remote_mta
        return p

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.ready.called:
            self.ready.errback(SessionError(
                LOCAL_CODE, "4.4.1", f"connect to {self.remote_mta}: {connect_reason(reason.value)}",
            ))


def connect(
    reactor: IReactorTime,
    endpoint: IStreamClientEndpoint,
    options: ClientOptions,
    remote_name: str,
    remote_ip: str = "",
    port: int = 25,
) -> Deferred:
    """
    Connect through C{endpoint} and set up a session: greeting, EHLO (HELO
    after a 5xx to EHLO), STARTTLS per C{options.tls} and EHLO again, AUTH
    if configured.  Fires with an L{SMTPConnection}, or errbacks with
    L{SessionError}.  C{reactor} supplies every timer (C{connect_timeout}
    here, the others in the protocol).
    """
    factory = SMTPClientFactory(reactor, options, remote_name, remote_ip, port)
    ready = factory.ready
    timed_out = []

    def on_timeout() -> None:
        timed_out.append(True)
        cd.cancel()

    cd = endpoint.connect(factory)
    timer = reactor.callLater(options.connect_timeout, on_timeout)

    def connected(proto: Any) -> None:
        if timer.active():
            timer.cancel()

    def failed(f: Failure) -> None:
        if timer.active():
            timer.cancel()
        if ready.called:
            return
        reason = "Connection timed out" if timed_out else connect_reason(f.value)
        # No connection: no remote MTA (a DSN names none, the log says relay=none).
        ready.errback(SessionError(LOCAL_CODE, "4.4.1", f"connect to {factory.remote_mta}: {reason}"))

    cd.addCallbacks(connected, failed)
    return ready
