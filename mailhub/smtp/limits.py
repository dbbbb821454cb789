"""
Limits of an SMTP session that are about time and pace, not about words:
request deadlines, the minimum data rate, the soft error delay and flow
control (the session as a push producer on its own transport).

Owns: L{LimitsMixin}, mixed into L{mailhub.smtp.server.SMTPServer}: its timer
(C{_timer}), the error delay (C{_sleep}, C{_slept}), the set of reasons
the session executes nothing (C{_pauses}: L{BUSY}, L{OUTPUT}, L{SLEEP})
and whether the transport's reading is paused (C{_paused}).

Flow control: nothing is executed while a commit is in progress
(C{factory.run}, e.g. C{deferToThread}), while the client does not read our
replies (the session is a streaming producer on its transport, which calls
C{pauseProducing} when its write buffer is full), or during the one-second
delay after C{soft_error_limit} errors; meanwhile the transport's reading
is paused once 64 KiB are waiting.

Timeouts (Postfix smtpd_per_request_deadline, smtpd_min_data_rate): a
command must be complete within C{timeout} of the previous one; bytes of an
unfinished line do not reset the timer.  In DATA / BDAT each buffer extends
the deadline by its size divided by C{min_data_rate}, at most to
C{timeout} from now.  While a TLS handshake is under way (after STARTTLS,
or on an smtps listener) the idle timeout keeps running and the handshake
has its own deadline (L{mailhub.smtp.tlsauth}); a session timing out then is
aborted without a reply.

Must not touch: parsing, replies' wording, the transaction or the spool.
The host protocol provides C{factory} (C{clock}, C{min_data_rate},
C{soft_error_limit}), C{config.timeout}, C{config.hostname}, C{transport},
C{session} (the client's address, for the "timeout after" mail event),
C{_commands} (L{mailhub.smtp.stats.CommandCounts}),
C{_buf}/C{_pos}, C{_closed}, C{_held}, and the methods C{_process},
C{_write}, C{_close}, C{_reset_transaction}, C{_finish_message}.  All
time comes from the injected clock.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall

from mailhub.maillog import mail_event

__all__ = ["LimitsMixin", "MAX_PENDING_INPUT", "ERROR_SLEEP", "BUSY", "OUTPUT", "SLEEP"]

#: Input kept while a commit is in progress before the transport is paused.
MAX_PENDING_INPUT = 65536
# Why the session reads no command: a commit or an AUTH check is in flight,
# the client is not reading our replies (the transport's write buffer is
# full: it called pauseProducing), or the soft error limit's delay runs.
BUSY, OUTPUT, SLEEP = "busy", "output", "sleep"
#: Seconds every reply waits once the soft error limit is reached (Postfix smtpd_error_sleep_time).
ERROR_SLEEP = 1.0


class LimitsMixin:
    """Deadlines, the error delay and flow control of one SMTP session (see the module docstring)."""

    factory: Any
    config: Any
    transport: Any
    session: Any
    _commands: Any
    _pauses: set[str]
    _timer: IDelayedCall | None
    _tls_timer: IDelayedCall | None
    _handshaking: bool
    _sleep: IDelayedCall | None
    _slept: bool
    _paused: bool

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
        mail_event(
            "timeout", "timeout after {command} from [{client}]",
            client=self.session.client_ip, command=self._commands.last, listener=self.session.listener,
        )
        stuck = OUTPUT in self._pauses
        self._reset_transaction()
        self._sasl = None
        if not self._handshaking:  # no reply can reach a client in the middle of a TLS handshake
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
        if self._tls_timer is not None and self._tls_timer.active():
            self._tls_timer.cancel()
        self._tls_timer = None

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
