"""
STARTTLS (RFC 3207) and AUTH PLAIN/LOGIN (RFC 4954) inside an SMTP session.

Owns: L{TLSAuth}, one per session, the component the session protocol
delegates the C{STARTTLS} and C{AUTH} commands to: the SASL exchange's
lines (L{TLSAuth.exchanging}, L{TLSAuth.line}), the wait for the checker
and the failure throttle, what the EHLO reply offers
(L{TLSAuth.starttls_offered}, L{TLSAuth.auth_offered}), and the
C{starttls} event once the handshake completed.

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

The TLS handshake's deadline (C{starttls_timeout}) is kept by the
session's L{mailhub.smtp.limits.Pacer}: this component starts it.

Must not touch: passwords and SASL decoding (L{mailhub.smtp.sasl}),
certificates (L{mailhub.tls}), sender ownership (L{mailhub.smtp.policy}),
the transaction and message data, the input buffer (only through
C{host.discard_input}).  What it uses of its host, the session protocol
(L{mailhub.smtp.server.SMTPServer}): C{session}, C{transport}, C{pacer},
C{closed}, C{in_transaction}, and the methods C{reply}, C{write},
C{send}, C{close}, C{flush_output}, C{discard_input}, C{reset_session},
C{process}.
"""

from __future__ import annotations

from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.interfaces import ITLSTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailhub.maillog import mail_event
from mailhub.smtp import sasl as auth
from mailhub.smtp.policy import is_loopback
from mailhub.smtp.proto import NEED_HELO, CommandError, Reply, _fields

__all__ = [
    "TLSAuth",
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


class TLSAuth:
    """
    The STARTTLS and AUTH commands of one SMTP session (see the module docstring).

    @param host: the session protocol.
    @param tls: the L{mailhub.tls.ServerTLS}, or C{None}: no STARTTLS.
    @param checker: the twisted.cred checker, or C{None}: no AUTH.
    @param throttle: the failure throttle shared by all listeners, or C{None}.
    @param allow_plaintext_loopback: offer AUTH without TLS to 127.0.0.1 / ::1.
    """

    def __init__(
        self, host: Any, tls: Any, checker: Any, throttle: auth.AuthThrottle | None, allow_plaintext_loopback: bool
    ) -> None:
        self.host = host
        self.tls = tls
        self.checker = checker
        self.throttle = throttle
        self.allow_plaintext_loopback = allow_plaintext_loopback
        self._sasl: auth.SASLExchange | None = None
        self._auth_wait: defer.Deferred[Any] | None = None
        self._starttls = False  # STARTTLS answered, handshake not yet complete

    @property
    def exchanging(self) -> bool:
        """An AUTH exchange waits for the client's next response line (it is never a command)."""
        return self._sasl is not None

    def forget(self) -> None:
        """Drop an unfinished AUTH exchange (the session was reset, timed out or is closing)."""
        self._sasl = None

    def line_too_long(self) -> bool:
        """A response line over the limit: the exchange ends with 500 5.5.6; False if none was going on."""
        if self._sasl is None:
            return False
        self._sasl = None
        self.host.reply(AUTH_LINE_TOO_LONG)
        return True

    def stop(self) -> None:
        """The connection is gone: no delayed AUTH reply is sent."""
        self._sasl = None
        wait, self._auth_wait = self._auth_wait, None
        if wait is not None:
            wait.cancel()

    def handshake_completed(self) -> None:
        """The TLS handshake after STARTTLS succeeded (for smtps the C{connection} event says tls)."""
        host = self.host
        if self._starttls and not host.closed:
            self._starttls = False
            mail_event(
                "starttls",
                "STARTTLS from [{client}] listener={listener}",
                client=host.session.client_ip, listener=host.session.listener,
            )

    # -- STARTTLS (RFC 3207) ---------------------------------------------------------------------

    def starttls_offered(self) -> bool:
        """On smtp and submission listeners with a certificate, until TLS is up."""
        return self.tls is not None and not self.host.session.tls

    def do_starttls(self, arg: str) -> None:
        host = self.host
        if arg:
            raise CommandError(501, "5.5.4", "Syntax: STARTTLS")
        if host.session.tls:
            raise CommandError(*_fields(TLS_ACTIVE))
        if self.tls is None:
            raise CommandError(502, "5.5.1", "Error: STARTTLS not implemented")
        if host.in_transaction:
            raise CommandError(*_fields(IN_TRANSACTION))
        if not ITLSTransport.providedBy(host.transport):
            raise CommandError(*_fields(TLS_UNAVAILABLE))
        host.reply(TLS_READY)
        # CVE-2011-0411: whatever the client pipelined after STARTTLS was
        # sent in clear text and may have been injected by a man in the
        # middle; it must never be executed as if it came over TLS.
        # Bytes arriving after startTLS() go to the TLS layer instead.
        pending = host.discard_input()
        if pending:
            log.info(
                "STARTTLS from [{client}]: {n} pipelined plaintext octets discarded",
                client=host.session.client_ip, n=pending,
            )
        host.reset_session()
        self._starttls = True
        host.flush_output()  # the 220 and what preceded it go out in clear text, before the handshake
        try:
            host.transport.startTLS(self.tls.options())
        except Exception:
            log.failure("STARTTLS failed for [{client}]", client=host.session.client_ip)
            host.close()
            return
        host.session.tls = True
        host.pacer.handshake_started()

    # -- AUTH (RFC 4954) ------------------------------------------------------------------------

    def auth_offered(self) -> bool:
        """
        PLAIN and LOGIN carry the password in clear: offered only with a
        users file, and only over TLS or (if allowed) from 127.0.0.1 / ::1.
        """
        if self.checker is None:
            return False
        session = self.host.session
        return session.tls or (self.allow_plaintext_loopback and is_loopback(session.client_ip))

    def do_auth(self, arg: str) -> None:
        host = self.host
        if self.checker is None:
            raise CommandError(502, "5.5.1", "Error: AUTH not implemented")
        if host.session.helo is None:
            raise CommandError(*_fields(NEED_HELO))
        if host.session.authenticated_user:
            raise CommandError(*auth.REPLY_ALREADY_AUTHENTICATED)
        if host.in_transaction:
            raise CommandError(*_fields(IN_TRANSACTION))
        if not self.auth_offered():
            if self.starttls_offered():
                raise CommandError(*auth.REPLY_ENCRYPTION_REQUIRED)  # 538 5.7.11
            raise CommandError(*_fields(AUTH_DISABLED))
        blocked: Any = False
        if self.throttle is not None:
            blocked = self.throttle.blocked(host.session.client_ip)
        if isinstance(blocked, defer.Deferred):
            # A throttle shared by several processes answers later: nothing
            # is read meanwhile.
            host.pacer.busy = True
            blocked.addBoth(self._blocked_answer, arg)
            return
        self._auth_start(arg, blocked)

    def _blocked_answer(self, blocked: Any, arg: str) -> None:
        host = self.host
        host.pacer.busy = False
        if host.closed:
            return
        if isinstance(blocked, Failure):
            log.failure("AUTH throttle error", blocked)
            self._done(_reply(auth.REPLY_TEMPORARY_FAILURE))
            return
        try:
            self._auth_start(arg, blocked)
        except CommandError as e:
            host.reply(e.reply)
        if not host.pacer.busy:
            host.process()

    def _auth_start(self, arg: str, blocked: bool) -> None:
        host = self.host
        if blocked:
            host.write(*auth.REPLY_TOO_MANY_FAILURES)
            host.close()
            return
        mechanism, _, initial = arg.partition(" ")
        if not mechanism:
            raise CommandError(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
        initial = initial.strip(" ")
        try:
            self._sasl = auth.SASLExchange(mechanism, initial.encode("utf-8") if initial else None)
        except auth.SASLError as e:
            raise CommandError(*e.reply) from None
        self._step()

    def _step(self) -> None:
        """Send the next 334 challenge, or check the credentials once complete."""
        host = self.host
        exchange = self._sasl
        assert exchange is not None
        try:
            step = exchange.next()
        except auth.SASLError as e:
            self._end(_reply(e.reply))
            return
        if isinstance(step, bytes):
            host.send(b"334 " + step + b"\r\n")
            return
        self._sasl = None
        throttle = self.throttle
        if throttle is None:
            self._check(step, exchange.mechanism, None, True)
            return
        slot = throttle.begin(host.session.client_ip)
        if isinstance(slot, defer.Deferred):
            host.pacer.busy = True  # read nothing more until the answer (and any delay) is sent
            slot.addErrback(self._slot_error, throttle, host.session.client_ip)
            slot.addCallback(lambda ok: self._check(step, exchange.mechanism, throttle, ok))
            return
        self._check(step, exchange.mechanism, throttle, slot)

    def _slot_error(self, failure: Failure, throttle: Any, client: str) -> bool:
        log.failure("AUTH throttle error", failure)
        return False

    def _check(self, step: Any, mechanism: str, throttle: Any, slot: bool) -> None:
        """Check the credentials if the throttle gave a slot; 421 and close if not."""
        host = self.host
        if not slot:
            host.pacer.busy = False
            if host.closed:
                return
            # Failures plus checks in flight from this IP (parallel
            # connections) already reach the limit: no more guesses.
            log.info("AUTH {mechanism} from [{client}] refused: too many attempts",
                     mechanism=mechanism, client=host.session.client_ip)
            host.write(*auth.REPLY_TOO_MANY_FAILURES)
            host.close()
            return
        if host.closed:  # the client left while the throttle answered: no check, the slot back
            host.pacer.busy = False
            if throttle is not None:
                throttle.finish(host.session.client_ip, ok=True)
            return
        host.pacer.busy = True  # read nothing more until the answer (and any delay) is sent
        # Not kept in _auth_wait: the connection's end must not cancel the
        # check, so that its throttle slot is held until the check really
        # ended (a thread cannot be stopped) and its outcome is counted.
        d = defer.maybeDeferred(self.checker.requestAvatarId, step)
        d.addBoth(self._checked, mechanism, throttle)

    def line(self, line: bytes) -> None:
        """A client response inside an AUTH exchange (never a command)."""
        exchange = self._sasl
        assert exchange is not None
        try:
            exchange.feed(line)  # "*" cancels: 501 5.7.0
        except auth.SASLError as e:
            self._end(_reply(e.reply))
            return
        self._step()

    def _end(self, reply: Reply) -> None:
        self._sasl = None
        self.host.reply(reply)

    def _checked(self, result: Any, mechanism: str, throttle: auth.AuthThrottle | None) -> None:
        """
        The checker answered.  The slot reserved in C{throttle} (the one
        L{auth.AuthThrottle.begin} was called on) is given back first, even
        when the connection is gone meanwhile (a wrong password still
        counts); the delayed 535 / 421 follows unless nobody is there.
        """
        host = self.host
        client = host.session.client_ip
        wrong = isinstance(result, Failure) and result.check(UnauthorizedLogin) is not None
        wait: defer.Deferred[bool] = defer.succeed(False)
        if throttle is not None:
            wait = throttle.finish(client, ok=not wrong)  # slot back; a failure is counted
        if host.closed:
            wait.cancel()  # nobody to answer: no delay timer
            wait.addErrback(lambda f: None)
            if isinstance(result, Failure) and not wrong:
                log.failure("AUTH checker error for [{client}]", result, client=client)
            return None
        if isinstance(result, Failure):
            if wrong:
                # The user name is not logged: clients type passwords into it.
                mail_event(
                    "auth_failed", "AUTH {mechanism} failed from [{client}]",
                    mechanism=mechanism, client=client, listener=host.session.listener, reason="auth_failed",
                )
                self._auth_wait = wait
                wait.addBoth(self._throttled)
                return None
            log.failure("AUTH checker error for [{client}]", result, client=client)
            self._done(_reply(auth.REPLY_TEMPORARY_FAILURE))
            return None
        host.session.authenticated_user = str(result)
        log.info(
            "AUTH {mechanism} from [{client}]: sasl_username={user}",
            mechanism=mechanism, client=client, user=host.session.authenticated_user,
        )
        self._done(_reply(auth.REPLY_AUTH_OK))
        return None

    def _throttled(self, close: Any) -> None:
        self._auth_wait = None
        host = self.host
        if host.closed:
            return None
        if isinstance(close, Failure):
            log.failure("AUTH throttle error", close)
            close = False
        if close:
            host.pacer.busy = False
            host.write(*auth.REPLY_TOO_MANY_FAILURES)
            host.close()
            return None
        self._done(_reply(auth.REPLY_AUTH_FAILED))
        return None

    def _done(self, reply: Reply) -> None:
        self.host.pacer.busy = False
        self.host.reply(reply)
        self.host.process()
