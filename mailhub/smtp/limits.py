"""
Limits of an SMTP session that are about time and pace, not about words:
request deadlines, the TLS handshake deadline, the minimum data rate, the
soft error delay and flow control.

Owns: L{Pacer}, one per session: its timers (the idle deadline, the
handshake deadline, the error delay), the set of reasons the session
executes nothing (L{BUSY}, L{OUTPUT}, L{SLEEP}) and whether the
transport's reading is paused.  The session tells it what happened
(L{Pacer.touch}, L{Pacer.extend}, L{Pacer.pause}, ...) and asks it whether
to go on (L{Pacer.held}, L{Pacer.must_sleep}); the pacer calls back the
three functions it was built with when a deadline passes, the error delay
ends or output may flow again.

Flow control: nothing is executed while a commit or an AUTH check is in
progress (L{BUSY}), while the client does not read our replies (the
session is a streaming producer on its transport, which calls
C{pauseProducing} when its write buffer is full: L{OUTPUT}), or during
the one-second delay after C{soft_error_limit} errors (L{SLEEP});
meanwhile the transport's reading is paused once 64 KiB are waiting.

Timeouts (Postfix smtpd_per_request_deadline, smtpd_min_data_rate): a
command must be complete within C{timeout} of the previous one; bytes of an
unfinished line do not reset the timer.  In DATA / BDAT each buffer extends
the deadline by its size divided by C{min_data_rate}, at most to
C{timeout} from now.  While a TLS handshake is under way (after STARTTLS,
or on an smtps listener) the idle timeout keeps running and the handshake
has its own deadline (C{starttls_timeout}, Postfix smtpd_starttls_timeout);
either ends the session through the same C{on_timeout}.

Must not touch: parsing, replies, the transaction, the spool, logging.
All time comes from the injected clock; the limits are read from the
C{[server]} settings at each use (a reload reaches open sessions).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["Pacer", "MAX_PENDING_INPUT", "ERROR_SLEEP", "BUSY", "OUTPUT", "SLEEP"]

#: Input kept while the session executes nothing before the transport's reading is paused.
MAX_PENDING_INPUT = 65536
# Why the session reads no command: a commit or an AUTH check is in flight,
# the client is not reading our replies (the transport's write buffer is
# full: it called pauseProducing), or the soft error limit's delay runs.
BUSY, OUTPUT, SLEEP = "busy", "output", "sleep"
#: Seconds every reply waits once the soft error limit is reached (Postfix smtpd_error_sleep_time).
ERROR_SLEEP = 1.0


class Pacer:
    """
    Deadlines, the error delay and flow control of one SMTP session (see
    the module docstring).

    @param clock: the reactor's time.
    @param server: the C{[server]} settings (C{timeout}, C{min_data_rate},
        C{soft_error_limit}, C{starttls_timeout}).
    @param on_timeout: called when the idle or the handshake deadline passed.
    @param on_wake: called when the error delay ended.
    @param reading: called with C{False} to pause the transport's reading,
        C{True} to resume it.
    """

    def __init__(
        self,
        clock: IReactorTime,
        server: Any,
        on_timeout: Callable[[], None],
        on_wake: Callable[[], None],
        reading: Callable[[bool], None],
    ) -> None:
        self._clock = clock
        self._server = server
        self._on_timeout = on_timeout
        self._on_wake = on_wake
        self._reading = reading
        self._pauses: set[str] = set()
        self._timer: IDelayedCall | None = None
        self._tls_timer: IDelayedCall | None = None
        self._sleep: IDelayedCall | None = None
        self._slept = False  # the error delay for the next reply has been served
        self._paused = False  # whether the transport's reading is paused
        self.handshaking = False  # a TLS handshake is under way (STARTTLS or smtps)

    # -- why nothing is executed -----------------------------------------------------------------

    @property
    def held(self) -> bool:
        """Whether the session must execute nothing now (busy, output blocked, or the error delay)."""
        return bool(self._pauses)

    @property
    def busy(self) -> bool:
        """A commit or an AUTH check is in flight: nothing more is read until it is answered."""
        return BUSY in self._pauses

    @busy.setter
    def busy(self, value: bool) -> None:
        if value:
            self._pauses.add(BUSY)
        else:
            self._pauses.discard(BUSY)

    @property
    def output_blocked(self) -> bool:
        """The client does not read our replies (the transport's write buffer is full)."""
        return OUTPUT in self._pauses

    def block_output(self) -> None:
        self._pauses.add(OUTPUT)

    def unblock_output(self) -> bool:
        """The write buffer drained; True if output was blocked."""
        if OUTPUT not in self._pauses:
            return False
        self._pauses.discard(OUTPUT)
        return True

    def update_reading(self, pending: int) -> None:
        """
        Pause the transport's reading while the session executes nothing
        (the client does not read our replies, a commit or AUTH check is
        in flight, the error delay runs) and more than
        L{MAX_PENDING_INPUT} octets (C{pending}) wait; resume when it goes
        on.  So a client that pipelines without reading holds at most that
        much input and the transport's write buffer (plus one batch of
        replies) in memory.  Reading is not paused at once on
        C{pauseProducing}: a TLS layer pauses its producer while the
        handshake is in progress, and the handshake needs reading.  The
        session does not call this once closed or after the client's EOF.
        """
        want = bool(self._pauses) and pending > MAX_PENDING_INPUT
        if want != self._paused:
            self._paused = want
            self._reading(not want)

    # -- the idle deadline ---------------------------------------------------------------------------

    def start(self) -> None:
        """The session began: the client has C{timeout} for its first command."""
        self._timer = self._clock.callLater(self._server.timeout, self._timed_out)

    def touch(self) -> None:
        """
        A request was completed (a command line, the end of a message):
        the client again has the full C{timeout} for the next one.  Bytes
        of an unfinished line do not count, so a client trickling one byte
        a second still times out (Postfix smtpd_per_request_deadline).
        """
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._server.timeout)

    def extend(self, n: int) -> None:
        """
        C{n} message bytes arrived: the deadline moves out by
        C{n / min_data_rate} seconds, never beyond C{timeout} from now
        (Postfix smtpd_min_data_rate).  A client sending slower than the
        minimum rate runs out of time; a faster one never does.
        """
        timer = self._timer
        rate = self._server.min_data_rate
        if timer is None or not timer.active() or not n or rate <= 0:
            return
        now = self._clock.seconds()
        deadline = min(timer.getTime() + n / rate, now + self._server.timeout)
        timer.reset(deadline - now)

    def _timed_out(self) -> None:
        self._timer = None
        self._on_timeout()

    def stop(self) -> None:
        """The session ends: no timer of it fires any more."""
        for timer in (self._timer, self._sleep, self._tls_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._sleep = self._tls_timer = None

    # -- the handshake deadline ----------------------------------------------------------------------

    def handshake_started(self) -> None:
        """
        A TLS handshake is under way (after STARTTLS, or from the start on
        an smtps listener): it must complete within C{starttls_timeout}
        (Postfix smtpd_starttls_timeout), and the idle timeout keeps
        running too.
        """
        self.handshaking = True
        limit = self._server.starttls_timeout
        if limit and limit > 0:
            self._tls_timer = self._clock.callLater(limit, self._handshake_timed_out)

    def handshake_finished(self) -> None:
        """The handshake completed: its deadline ends; the client has the full C{timeout} again."""
        if not self.handshaking:
            return
        self.handshaking = False
        timer, self._tls_timer = self._tls_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self.touch()

    def _handshake_timed_out(self) -> None:
        self._tls_timer = None
        if not self.handshaking:
            return
        idle, self._timer = self._timer, None
        if idle is not None and idle.active():
            idle.cancel()
        self._on_timeout()

    # -- the soft error limit ------------------------------------------------------------------------

    def must_sleep(self, errors: int) -> bool:
        """
        After C{soft_error_limit} errors every reply waits one second
        (Postfix smtpd_soft_error_limit / smtpd_error_sleep_time), through
        the clock: the session executes nothing meanwhile, so pipelined
        commands stay in order.  True if that wait was just started;
        C{on_wake} is called when it ends.
        """
        if errors <= 0:
            return False  # every command line asks: no settings lookup in the common case
        limit = self._server.soft_error_limit
        if not limit or errors < limit:
            return False
        if self._slept:
            self._slept = False
            return False
        self._pauses.add(SLEEP)
        self._sleep = self._clock.callLater(ERROR_SLEEP, self._wake)
        return True

    def served(self) -> None:
        """The next command line already waited its error delay."""
        self._slept = True

    def _wake(self) -> None:
        self._sleep = None
        self._pauses.discard(SLEEP)
        self._on_wake()
