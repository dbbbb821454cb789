"""
The LMTP client protocol (RFC 2033): one connection to an LMTP server
(Dovecot's C{lmtp}, Cyrus...), its greeting and LHLO, and transactions
whose end of data is answered once per accepted recipient.

Owns: L{LMTPClient}: reading replies (lines at most L{MAX_LINE} octets,
replies at most L{MAX_LINES} lines, nothing unsolicited beyond
L{MAX_EARLY}), one timer per awaited reply, the LHLO keywords, and one
transaction (L{LMTPClient.transaction}) turned into one L{Outcome} per
recipient: the reply to its RCPT when that refused it, else its own reply
after the data (RFC 2033 4.2), taken one by one -- a 452 for one recipient
defers only that one, a 550 fails only that one.  A recipient whose final
reply never came (connection lost, timeout, a reply that is no reply)
is temporary with code 0: it is tried again, never counted as delivered
and never failed.  After any such error the connection is not used again.

Must not touch: connections and their reuse (L{mailhub.delivery.lmtp}),
retry decisions (the scheduler's), dot-stuffing (L{mailhub.relay.dotstuff},
whose body producer streams the queue file).
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet import protocol
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from mailhub.eagerwrite import write_now
from mailhub.envelope import Envelope, Outcome, Recipient
from mailhub.queue.queuefile import QueueFileError, open_message
from mailhub.relay.dotstuff import BodyProducer
from mailhub.relay.reply import ConnectionBroken, SMTPReply, parse_reply

__all__ = ["LMTPClient", "MAX_LINE", "MAX_LINES", "MAX_EARLY"]

#: Longest reply line read (RFC 5321 4.5.3.1.5: 512; servers write longer texts).
MAX_LINE = 2048
#: Lines of one multi-line reply.
MAX_LINES = 100
#: Replies nobody waits for, kept until asked (a server talking out of turn is cut off beyond).
MAX_EARLY = 10


class LMTPClient(protocol.Protocol):
    """
    One LMTP connection.  C{ready} fires with the LHLO reply once the
    server greeted and answered LHLO (or with a L{ConnectionBroken}).

    @param name: how outcomes name the server (C{remote_mta}).
    @param timeout: seconds for each reply (and between two writes of the data).
    @param data_timeout: seconds for the replies after the end of the data.
    """

    def __init__(self, clock: IReactorTime, hostname: str, name: str, timeout: float, data_timeout: float) -> None:
        self.clock = clock
        self.hostname = hostname
        self.name = name
        self.timeout = timeout
        self.data_timeout = data_timeout
        self.usable = False
        #: the last transaction got a reply to MAIL (before it, nothing about the message was said)
        self.mail_answered = False
        self.extensions: set[str] = set()
        self.ready: Deferred[Any] = Deferred()
        self._buf = b""
        self._lines: list[tuple[int, str]] = []
        self._early: list[SMTPReply] = []
        self._waiter: Deferred[Any] | None = None
        self._timer: IDelayedCall | None = None
        self._xfer: IDelayedCall | None = None
        self._closed = False
        self._broken: ConnectionBroken | None = None
        self._producer: BodyProducer | None = None

    # -- connection ---------------------------------------------------------------

    def connectionMade(self) -> None:
        ensureDeferred(self._hello()).addBoth(self._hello_done)

    async def _hello(self) -> SMTPReply:
        greeting = await self._expect(self.timeout, "waiting for the greeting")
        if greeting.code != 220:
            raise ConnectionBroken(f"{self.name} greeted with {greeting.said}", greeting.enhanced, code=greeting.code)
        lhlo = await self._command(f"LHLO {self.hostname}", self.timeout, "sending LHLO")
        if lhlo.code != 250:
            raise ConnectionBroken(f"{self.name} refused LHLO: {lhlo.said}", lhlo.enhanced, code=lhlo.code)
        self.extensions = {line.split(" ", 1)[0].upper() for line in lhlo.lines[1:]}
        self.usable = True
        return lhlo

    def _hello_done(self, result: Any) -> None:
        if isinstance(result, Failure):
            if not result.check(ConnectionBroken):
                result = Failure(ConnectionBroken(f"LMTP error with {self.name}: {result.getErrorMessage()}"))
            self.abort(result.value.text if isinstance(result.value, ConnectionBroken) else "LMTP error")
        self.ready.callback(result)

    def connectionLost(self, reason: Any = None) -> None:
        self._closed = True
        self.usable = False
        self._fail_waiting(self._broken or ConnectionBroken(f"lost connection with {self.name}"))

    def _fail_waiting(self, error: ConnectionBroken) -> None:
        self._cancel_timer()
        self._cancel_xfer()
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.fail(error)
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.errback(error)

    def abort(self, why: str, enhanced: str = "4.4.2") -> None:
        """Give up on this connection: every awaited reply fails with C{why}."""
        self.usable = False
        if self._broken is None:
            self._broken = ConnectionBroken(why, enhanced)
        if not self._closed and self.transport is not None:
            cast(Any, self.transport).abortConnection()
        self._fail_waiting(self._broken)

    def quit(self) -> None:
        """Say QUIT and close (the reply is not awaited)."""
        self.usable = False
        if not self._closed and self.transport is not None:
            self._write("QUIT")
            self.transport.loseConnection()

    # -- replies ---------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        while not self._closed:
            i = self._buf.find(b"\n")
            if i < 0 or i > MAX_LINE:
                if len(self._buf) > MAX_LINE or i > MAX_LINE:
                    self.abort(f"reply line from {self.name} too long", "4.5.0")
                return
            raw, self._buf = self._buf[:i].rstrip(b"\r"), self._buf[i + 1 :]
            text = raw.decode("utf-8", "replace")
            if len(text) < 3 or not text[:3].isdigit() or (len(text) > 3 and text[3] not in " -"):
                self.abort(f"malformed reply from {self.name}: {text[:100]!r}", "4.5.0")
                return
            self._lines.append((int(text[:3]), text[4:]))
            if len(self._lines) > MAX_LINES:
                self.abort(f"reply from {self.name} has too many lines", "4.5.0")
                return
            if len(text) > 3 and text[3] == "-":
                continue
            reply = parse_reply(self._lines)
            self._lines = []
            waiter, self._waiter = self._waiter, None
            if waiter is None:
                self._early.append(reply)
                if len(self._early) > MAX_EARLY:
                    self.abort(f"too many unexpected replies from {self.name}", "4.5.0")
                continue
            self._cancel_timer()
            waiter.callback(reply)

    def _expect(self, timeout: float, what: str) -> Deferred[SMTPReply]:
        d: Deferred[SMTPReply] = Deferred()
        if self._early:
            d.callback(self._early.pop(0))
            return d
        if self._closed or self._broken is not None:
            d.errback(self._broken or ConnectionBroken(f"lost connection with {self.name} while {what}"))
            return d
        self._waiter = d
        self._timer = self.clock.callLater(timeout, self._timed_out, what)
        return d

    def _timed_out(self, what: str) -> None:
        self._timer = None
        self.abort(f"conversation with {self.name} timed out while {what}")

    def _arm_xfer(self) -> None:
        """The data moved: the client has C{timeout} seconds more until it moves again."""
        self._cancel_xfer()
        self._xfer = self.clock.callLater(self.timeout, self._timed_out, "sending the message")

    def _cancel_xfer(self) -> None:
        xfer, self._xfer = self._xfer, None
        if xfer is not None and xfer.active():
            xfer.cancel()

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _write(self, line: str) -> None:
        if not self._closed and self.transport is not None:
            write_now(self.transport, line.encode("utf-8") + b"\r\n")

    async def _command(self, line: str, timeout: float, what: str) -> SMTPReply:
        self._write(line)
        return await self._expect(timeout, what)

    # -- one transaction ------------------------------------------------------------------

    def _outcome(self, r: Recipient, reply: SMTPReply, stage: str) -> Outcome:
        text = f"host {self.name} said: {reply.said} (in reply to {stage})"
        if reply.code // 100 == 2:
            return Outcome.delivered(r.address, text, self.name)
        if reply.code // 100 == 5:
            return Outcome.permanent(r.address, text, reply.code, reply.enhanced, self.name)
        if reply.code // 100 == 4:
            return Outcome.temporary(r.address, text, reply.code, reply.enhanced, self.name)
        self.abort(f"unexpected reply from {self.name} to {stage}: {reply.said[:100]}", "4.5.0")
        raise self._broken or ConnectionBroken("unexpected reply")

    def _mail_params(self, envelope: Envelope) -> str:
        params = ""
        body = str(envelope.esmtp.get("body", "")).upper()
        if body in ("8BITMIME", "BINARYMIME") and "8BITMIME" in self.extensions:
            params += " BODY=8BITMIME"
        if envelope.esmtp.get("smtputf8") and "SMTPUTF8" in self.extensions:
            params += " SMTPUTF8"
        return params

    async def transaction(self, envelope: Envelope, recipients: list[Recipient], message_path: str) -> list[Outcome]:
        """
        Deliver the queued message at C{message_path} to C{recipients};
        one outcome per recipient, in their order.  Never raises: a broken
        connection leaves every recipient without a final reply temporary.
        """
        outcomes: dict[int, Outcome] = {}
        try:
            try:
                body = open_message(message_path)
            except (OSError, QueueFileError) as e:
                text = f"cannot read the queued message: {e}"[:300]
                return [Outcome.temporary(r.address, text, 0, "4.3.0") for r in recipients]
            with body:
                return await self._transaction(envelope, recipients, body, outcomes)
        except ConnectionBroken as e:
            self.abort(e.text, e.enhanced)
            return [
                outcomes.get(i) or Outcome.temporary(r.address, e.text, 0, e.enhanced, self.name)
                for i, r in enumerate(recipients)
            ]
        finally:
            self._producer = None

    async def _transaction(
        self, envelope: Envelope, recipients: list[Recipient], body: Any, outcomes: dict[int, Outcome]
    ) -> list[Outcome]:
        self.mail_answered = False
        if not self.usable:
            raise self._broken or ConnectionBroken(f"connection to {self.name} is not usable")
        mail = await self._command(
            f"MAIL FROM:<{envelope.sender}>{self._mail_params(envelope)}", self.timeout, "sending MAIL FROM"
        )
        self.mail_answered = True
        if mail.code // 100 != 2:
            for i, r in enumerate(recipients):
                outcomes[i] = self._outcome(r, mail, "MAIL FROM")
            await self._reset()
            return [outcomes[i] for i in range(len(recipients))]
        accepted: list[int] = []
        for i, r in enumerate(recipients):
            reply = await self._command(f"RCPT TO:<{r.address}>", self.timeout, "sending RCPT TO")
            if reply.code // 100 == 2:
                accepted.append(i)
            else:
                outcomes[i] = self._outcome(r, reply, "RCPT TO")
        if not accepted:
            await self._reset()
            return [outcomes[i] for i in range(len(recipients))]
        data = await self._command("DATA", self.timeout, "sending DATA")
        if data.code != 354:
            for i in accepted:
                if data.code // 100 in (4, 5):
                    outcomes[i] = self._outcome(recipients[i], data, "DATA")
                else:
                    raise ConnectionBroken(f"unexpected reply from {self.name} to DATA: {data.said[:100]}", "4.5.0")
            await self._reset()
            return [outcomes[i] for i in range(len(recipients))]
        producer = self._producer = BodyProducer(
            self.transport, self.clock, body,
            progress=self._arm_xfer,
            read_error=lambda e: self.abort(f"error reading the queued message: {e}", "4.3.0"),
            lost=lambda: self._broken or ConnectionBroken(f"lost connection with {self.name} while sending the message"),
        )
        producer.start()
        broken = await producer.done
        self._cancel_xfer()
        if broken is not None:
            raise broken if isinstance(broken, ConnectionBroken) else ConnectionBroken(str(broken))
        for i in accepted:  # RFC 2033 4.2: one reply per accepted recipient, in RCPT order
            reply = await self._expect(self.data_timeout, "waiting for the replies after the data")
            outcomes[i] = self._outcome(recipients[i], reply, "end of data")
        return [outcomes[i] for i in range(len(recipients))]

    async def _reset(self) -> None:
        reply = await self._command("RSET", self.timeout, "sending RSET")
        if reply.code // 100 != 2:
            self.abort(f"{self.name} refused RSET: {reply.said[:100]}", "4.5.0")
