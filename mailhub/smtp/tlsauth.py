"""
STARTTLS (RFC 3207) and AUTH PLAIN/LOGIN (RFC 4954) inside an SMTP session.

Owns: L{TLSAuthMixin}, mixed into L{mailhub.smtp.server.SMTPServer}: the
C{STARTTLS} and C{AUTH} commands, the SASL exchange's lines
(C{_sasl}, the C{SASL} input mode), the wait for the checker and the
failure throttle (C{_auth_wait}), and the C{starttls} event once the
handshake completed.

STARTTLS (CVE-2011-0411): after C{220 2.0.0 Ready to start TLS} every
byte the client sent in clear after the STARTTLS line is discarded, then
C{transport.startTLS} is called and the session is reset (HELO, AUTH and
transaction forgotten: EHLO again).  AUTH is offered only with a users
file and over TLS (or from 127.0.0.1/::1 when allowed); a failed login is
answered only after the throttle's delay, and nothing is read meanwhile.
Each credential check holds a throttle slot (L{auth.AuthThrottle.begin})
from before it starts until its outcome is counted, also when the client
disconnected meanwhile, so parallel connections from one IP cannot have
more than C{max_failures} guesses evaluated per window.
Passwords and SASL responses are never logged.

Must not touch: passwords and SASL decoding (L{mailhub.smtp.sasl}),
certificates (L{mailhub.tls}), sender ownership (L{mailhub.smtp.policy}), the
transaction and message data.  The host protocol provides C{factory}
(C{tls}, C{checker}, C{throttle}, C{allow_plaintext_loopback}),
C{session}, C{transport}, C{_buf}/C{_pos}, C{_mode}, C{_tx}, C{_busy},
C{_closed}, C{_starttls}, C{_handshaking}, C{_tls_timer}, and the
methods C{reply}, C{_write}, C{_close}, C{_command}, C{_process},
C{reset_session}, C{_touch}, C{_timed_out}.

The TLS handshake has its own deadline (C{factory.starttls_timeout},
Postfix smtpd_starttls_timeout), after STARTTLS and on smtps listeners
alike, and the idle C{timeout} keeps running while it is under way: a
client that answers the C{220} with nothing, or with half a ClientHello,
is disconnected (aborted: no reply can be sent before the handshake
completes, and none may go out in clear text) and its connection slot is
freed.
"""

from __future__ import annotations

from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.interfaces import ITLSTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailhub.smtp import sasl as auth
from mailhub.maillog import mail_event
from mailhub.smtp.policy import is_loopback
from mailhub.smtp.proto import COMMAND, NEED_HELO, SASL, CommandError, Reply, _fields

__all__ = [
    "TLSAuthMixin",
    "TLS_READY",
    "TLS_ACTIVE",
    "TLS_UNAVAILABLE",
    "IN_TRANSACTION",
    "AUTH_DISABLED",
    "AUTH_LINE_TOO_LONG",
]

log = Logger()

TLS_READY = Reply(220, "2.0.0", "Ready to start TLS")
TLS_ACTIVE = Reply(503, "5.5.1", "Error: TLS already active")
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available due to local problem")
IN_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
AUTH_DISABLED = Reply(503, "5.5.1", "Error: authentication not enabled")
AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication Exchange line is too long")


def _reply(t: tuple[int, str, str]) -> Reply:
    """An L{auth} C{REPLY_*} tuple as a L{Reply}."""
    return Reply(*t)


class TLSAuthMixin:
    """The STARTTLS and AUTH commands of one SMTP session (see the module docstring)."""

    factory: Any
    session: Any
    transport: Any
    _sasl: auth.SASLExchange | None
    _auth_wait: defer.Deferred[Any] | None

    # IHandshakeListener (declared by SMTPServer)

    def handshakeCompleted(self) -> None:
        """The TLS handshake after STARTTLS succeeded (for smtps the C{connection} event says tls)."""
        self._handshake_finished()
        if self._starttls and not self._closed:
            self._starttls = False
            mail_event(
                "starttls",
                "STARTTLS from [{client}] listener={listener}",
                client=self.session.client_ip, listener=self.session.listener,
            )

    # -- the handshake deadline ------------------------------------------------------------------

    def _handshake_started(self) -> None:
        """
        A TLS handshake is under way (after STARTTLS, or from the start on
        an smtps listener): it must complete within C{starttls_timeout}
        (Postfix smtpd_starttls_timeout), and the idle timeout keeps
        running too.  A session closed meanwhile is aborted, since no
        reply can reach a client that has not finished its handshake.
        """
        self._handshaking = True
        limit = self.factory.starttls_timeout
        if limit and limit > 0:
            self._tls_timer = self.factory.clock.callLater(limit, self._handshake_timed_out)

    def _handshake_finished(self) -> None:
        """The handshake completed: its deadline ends; the client has the full C{timeout} again."""
        if not self._handshaking:
            return
        self._handshaking = False
        timer, self._tls_timer = self._tls_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self._touch()

    def _handshake_timed_out(self) -> None:
        self._tls_timer = None
        if self._closed or not self._handshaking:
            return
        idle = self._timer
        if idle is not None and idle.active():
            idle.cancel()
        self._timed_out()

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
        self._flush_output()  # the 220 and what preceded it go out in clear text, before the handshake
        try:
            self.transport.startTLS(self.factory.tls.options())
        except Exception:
            log.failure("STARTTLS failed for [{client}]", client=self.session.client_ip)
            self._close()
            return
        self.session.tls = True
        self._handshake_started()

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
            self._send(b"334 " + step + b"\r\n")
            return
        self._sasl = None
        self._mode = COMMAND
        throttle = self.factory.throttle
        if throttle is not None and not throttle.begin(self.session.client_ip):
            # Failures plus checks in flight from this IP (parallel
            # connections) already reach the limit: no more guesses.
            log.info("AUTH {mechanism} from [{client}] refused: too many attempts",
                     mechanism=exchange.mechanism, client=self.session.client_ip)
            self._write(*auth.REPLY_TOO_MANY_FAILURES)
            self._close()
            return
        self._busy = True  # read nothing more until the answer (and any delay) is sent
        # Not kept in _auth_wait: connectionLost must not cancel the check,
        # so that its throttle slot is held until the check really ended
        # (a thread cannot be stopped) and its outcome is counted.
        d = defer.maybeDeferred(self.factory.checker.requestAvatarId, step)
        d.addBoth(self._auth_checked, exchange.mechanism, throttle)

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

    def _auth_checked(self, result: Any, mechanism: str, throttle: auth.AuthThrottle | None) -> None:
        """
        The checker answered.  The slot reserved in C{throttle} (the one
        L{auth.AuthThrottle.begin} was called on) is given back first, even
        when the connection is gone meanwhile (a wrong password still
        counts); the delayed 535 / 421 follows unless nobody is there.
        """
        client = self.session.client_ip
        wrong = isinstance(result, Failure) and result.check(UnauthorizedLogin) is not None
        wait: defer.Deferred[bool] = defer.succeed(False)
        if throttle is not None:
            wait = throttle.finish(client, ok=not wrong)  # slot back; a failure is counted
        if self._closed:
            wait.cancel()  # nobody to answer: no delay timer
            wait.addErrback(lambda f: None)
            if isinstance(result, Failure) and not wrong:
                log.failure("AUTH checker error for [{client}]", result, client=client)
            return None
        if isinstance(result, Failure):
            if wrong:
                # The user name is not logged: clients type passwords into it.
                log.info("AUTH {mechanism} failed from [{client}]", mechanism=mechanism, client=client)
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
