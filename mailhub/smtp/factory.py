"""
The SMTP server factory of one listener: settings, connection counting,
the spool's free space, and the shutdown drain.

Owns: L{SMTPServerFactory} (builds one L{SMTPServer} per connection from
one frozen L{SMTPSettings}; admits or refuses connections by
C{max_connections} / C{max_connections_per_ip}; measures the spool's free
space for MAIL, Postfix queue_minfree; tracks commits in flight and
drains them at shutdown) and its public view of the sessions:
L{SMTPServerFactory.sessions} (every open session), a session's
C{closed} and C{busy} (a commit or AUTH check in flight), and its
C{close} / C{shut_down}.

Must not touch: a session's conversation or its private state (only the
public names above), the relay decision (L{Policy}), the spool's files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailhub.envelope import Envelope
from mailhub.queue.commit import Committer, SpoolCommitter
from mailhub.queue.spool import Spool
from mailhub.ratelimit.limits import RateLimits
from mailhub.smtp import sasl as auth
from mailhub.smtp.checks import MessageCheck
from mailhub.smtp.policy import Policy
from mailhub.smtp.proxyheader import ProxyGate
from mailhub.smtp.server import SMTPServer
from mailhub.smtp.settings import SMTPSettings
from mailhub.users import UsersChecker, UsersFile, owns_sender

__all__ = ["SMTPServerFactory", "SMTPSettings", "FREE_SPACE_CACHE", "spool_free_space"]

log = Logger()

#: Seconds a measurement of the spool's free space is reused (a flood of MAIL commands costs one statvfs a second).
FREE_SPACE_CACHE = 1.0


def _call(f: Callable[..., Any], *args: Any) -> Any:
    return f(*args)


def spool_free_space(path: str) -> int:
    """Bytes an unprivileged writer may still use on the file system of C{path} (statvfs f_bavail)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class SMTPServerFactory(protocol.Factory[SMTPServer]):
    """
    Builds L{SMTPServer}s for one listener and counts their connections.

    @param settings: the listener's L{SMTPSettings} (the C{[server]}
        table, the listener's name and its per-listener values).
    @param enqueue: called with each committed envelope (the scheduler).
    @param run: how to call the blocking C{SpoolWriter.commit} (fsyncs):
        default in the reactor thread; pass C{twisted.internet.threads.deferToThread}
        to keep the reactor responsive.  The session reads no commands until
        the commit is done.
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
    @param checks: the L{mailhub.smtp.checks.MessageCheck}s every message
        passes, in order, between the end of its data and its commit.
    @param milters: the listener's milters (an object whose
        C{session(server)} gives each session its milter conversations:
        L{mailhub.milter.session.Milters}); their end-of-message part is
        one of C{checks}.
    @param free_space: how to measure the spool's free bytes (default:
        statvfs of the spool directory, L{spool_free_space}); tests pass a fake.
    @param ratelimit: the L{mailhub.ratelimit.limits.RateLimits} checked at
        connect, MAIL and RCPT (docs/ratelimits.rst); None: none.
    @param proxy: the L{mailhub.smtp.proxyheader.ProxyGate} of
        C{server.proxy_from}; None: no PROXY headers are read.
    @param committer: what makes an accepted message durable before its
        250 (L{mailhub.queue.commit.Committer}); default the spool path,
        C{SpoolCommitter(run, enqueue)}.  The daemon may give
        L{mailhub.delivery.direct.DirectDelivery} (deliver on accept).
    @param gate: where connections are admitted when they are counted
        over several processes (L{mailhub.daemon.anvil.RemoteGate}:
        C{admit(name, ip) -> Deferred[str]}, C{release(name, ip)}); default
        C{None}: this factory counts them itself.
    @param gate_name: this listener's name at the C{gate} (its endpoint).

    The limits (C{max_hops}, C{min_data_rate}, C{soft_error_limit},
    C{starttls_timeout}, C{timeout}, ...) are read from
    C{settings.server} when a session needs them.
    """

    noisy = False  # no "Starting factory" line at start and stop (mailhub/loglevel.py)

    protocol = SMTPServer

    def __init__(
        self,
        settings: SMTPSettings,
        spool: Spool,
        enqueue: Callable[[Envelope], None],
        policy: Policy,
        clock: IReactorTime,
        run: Callable[..., Any] = _call,
        *,
        tls: Any = None,
        users: UsersFile | None = None,
        checker: Any = None,
        throttle: auth.AuthThrottle | None = None,
        free_space: Callable[[], int] | None = None,
        checks: Sequence[MessageCheck] = (),
        milters: Any = None,
        ratelimit: RateLimits | None = None,
        proxy: ProxyGate | None = None,
        committer: Committer | None = None,
        gate: Any = None,
        gate_name: str = "",
    ) -> None:
        self.settings = settings
        #: the end-of-data stage (L{mailhub.smtp.checks}), in order
        self.checks: list[MessageCheck] = list(checks)
        #: the listener's milters (L{mailhub.milter.session.Milters}: C{session(smtp_server)}), or None
        self.milters = milters
        self.config = settings.server
        #: the rate limits (connections, MAIL, RCPT), or None
        self.ratelimit = ratelimit if ratelimit is not None and ratelimit.active else None
        #: C{server.proxy_from}: peers that must start with a PROXY header, or None
        self.proxy = proxy if proxy else None
        self.listener = settings.listener
        self.tls = tls
        self.users = users
        if checker is None and users is not None:
            checker = UsersChecker(users)
        self.checker = checker
        if throttle is None and checker is not None:
            throttle = auth.AuthThrottle(clock)
        self.throttle = throttle
        self.free_space = free_space if free_space is not None else (lambda: spool_free_space(spool.path))
        self._free: tuple[float, int] | None = None  # (when, bytes): the last measurement
        self.spool = spool
        self.enqueue = enqueue
        self.policy = policy
        self.clock = clock
        self.run = run
        #: makes each accepted message durable (L{mailhub.queue.commit})
        # the default reads run and enqueue when it commits: both may be replaced after construction
        self.committer: Committer = (
            committer if committer is not None
            else SpoolCommitter(lambda *args: self.run(*args), lambda envelope: self.enqueue(envelope))
        )
        self.gate = gate
        self.gate_name = gate_name or settings.listener
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
            if self.draining and not session.closed and not session.busy:
                # The reply is in the transport's buffer: loseConnection
                # flushes it before closing, the reactor's disconnectAll
                # would drop it.  Wait for connectionLost.
                self._closing.add(session)
                session.close()
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
            if session not in committing and not session.closed:
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
        minimum = self.settings.min_free_space
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
            return self.users.may_send_as(user, sender, separator=self.settings.extension_separator)
        return owns_sender(user, sender, separator=self.settings.extension_separator)

    def admission(self, ip: str) -> str | defer.Deferred[str]:
        """
        Count a new connection from C{ip}: "" when admitted, else the name
        of the limit reached (C{max_connections}, C{max_connections_per_ip});
        a Deferred of that when the C{gate} decides.
        """
        if self.gate is None:
            if self.connections >= self.config.max_connections:
                return "max_connections"
            if self.per_ip.get(ip, 0) >= self.config.max_connections_per_ip:
                return "max_connections_per_ip"
            self._count(ip)
            return ""

        def counted(limit: str) -> str:
            if not limit:
                self._count(ip)
            return limit

        return self.gate.admit(self.gate_name, ip).addCallback(counted)

    def admit(self, ip: str) -> bool:
        """Count a new connection from C{ip}; False if a limit is reached (no C{gate})."""
        return self.admission(ip) == ""

    def _count(self, ip: str) -> None:
        self.connections += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1

    def release(self, ip: str) -> None:
        if self.gate is not None:
            self.gate.release(self.gate_name, ip)
        self.connections -= 1
        left = self.per_ip.get(ip, 0) - 1
        if left > 0:
            self.per_ip[ip] = left
        else:
            self.per_ip.pop(ip, None)
