"""
One connection to one milter: L{MilterProtocol} sends commands and
waits for the milter's answers, each within its deadline.

Owns: the connection's life (connect with its timeout, options
negotiation, one command at a time, SMFIR_PROGRESS, quit), the deadlines
(C{connect_timeout}, C{command_timeout}, C{content_timeout} for the body
and end of message), gathering end-of-message modifications (only the
actions the milter negotiated; a replacement body bounded by
C{max_body} and kept in a L{tempfile.SpooledTemporaryFile}, so memory
stays bounded).  Any failure -- refused connection, timeout, a broken
packet, an unexpected reply, the milter closing -- fails the waiting
Deferred with L{MilterFailure} and closes the connection: the caller
applies the milter's default action.

Must not touch: SMTP sessions, replies to clients, the message store
(L{mailhub.milter.session} and L{mailhub.milter.check} do that).  Time
comes from the clock passed in; nothing blocks.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mailhub.milter import codec
from mailhub.milter.codec import MilterProtocolError, Modification, Negotiated, Response

__all__ = ["MilterFailure", "MilterProtocol", "EndOfMessage", "open_milter", "endpoint"]

log = Logger()

#: SMFIR_* action byte -> the SMFIF_* flag a milter must have negotiated to send it.
_NEEDS = {
    codec.ADDHEADER: codec.F_ADDHDRS, codec.INSHEADER: codec.F_ADDHDRS, codec.CHGHEADER: codec.F_CHGHDRS,
    codec.REPLBODY: codec.F_CHGBODY, codec.ADDRCPT: codec.F_ADDRCPT, codec.ADDRCPT_PAR: codec.F_ADDRCPT_PAR,
    codec.DELRCPT: codec.F_DELRCPT, codec.QUARANTINE: codec.F_QUARANTINE, codec.CHGFROM: codec.F_CHGFROM,
}
#: At most this many modifications from one milter for one message,
MAX_MODIFICATIONS = 1000
#: and at most this many bytes of header fields and addresses in them.
MAX_CHANGES_SIZE = 1024 * 1024


class MilterFailure(Exception):
    """The milter is unusable for now (the text says why, for the log)."""


@dataclass
class EndOfMessage:
    """A milter's answer at end of message: its verdict, its modifications in order, its new body (if any)."""

    response: Response
    modifications: list[Modification] = field(default_factory=list)
    body: IO[bytes] | None = None
    body_size: int = 0
    changes_size: int = 0


class MilterProtocol(protocol.Protocol):
    """
    The MTA side of one milter connection.  C{negotiate} first; then
    L{send} (no answer expected) and L{ask} (one answer), one at a time.
    """

    def __init__(self, clock: IReactorTime, name: str, command_timeout: float, content_timeout: float,
                 max_body: int, spill_dir: str | None = None) -> None:
        self.clock = clock
        self.name = name
        self.command_timeout = command_timeout
        self.content_timeout = content_timeout
        self.max_body = max_body
        self.spill_dir = spill_dir
        self.negotiated: Negotiated | None = None
        self.failed: str | None = None  # why the connection is unusable
        self._reader = codec.PacketReader()
        self._waiting: defer.Deferred[Any] | None = None
        self._timer: IDelayedCall | None = None
        self._timeout = 0.0
        self._eom: EndOfMessage | None = None
        self._negotiating = False
        self.connected_ = False

    # -- connection -------------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected_ = True

    def connectionLost(self, reason: Any = None) -> None:
        self.connected_ = False
        self._fail("milter closed the connection")

    def dataReceived(self, data: bytes) -> None:
        try:
            packets = self._reader.feed(data)
            for command, payload in packets:
                self._packet(command, payload)
        except MilterProtocolError as e:
            self._fail(f"protocol error: {e}")

    def _fail(self, why: str) -> None:
        if self.failed is None:
            self.failed = why
        self._stop_timer()
        self._discard_body()
        d, self._waiting = self._waiting, None
        if self.transport is not None and self.connected_:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        if d is not None:
            d.errback(MilterFailure(why))

    def _discard_body(self) -> None:
        eom, self._eom = self._eom, None
        if eom is not None and eom.body is not None:
            eom.body.close()

    def close(self) -> None:
        """Say QUIT and close (the session ended)."""
        if self.failed is None and self.connected_ and self.transport is not None:
            self.transport.write(codec.packet(codec.QUIT))
            self.failed = "closed"
            self.transport.loseConnection()

    # -- commands ----------------------------------------------------------------

    def negotiate(self) -> defer.Deferred[Negotiated]:
        """Send OPTNEG (version 6, every action and step); fire with what the milter chose."""
        self._negotiating = True
        return self._start([codec.optneg()], self.command_timeout)

    def send(self, packets: Sequence[bytes]) -> None:
        """Packets that get no answer (macros, ABORT, steps the milter said it will not answer)."""
        if self.failed is None and self.transport is not None:
            self.transport.write(b"".join(packets))

    def ask(self, packets: Sequence[bytes], content: bool = False) -> defer.Deferred[Response]:
        """Send C{packets}; fire with the milter's answer to the last one (C{content}: the longer deadline)."""
        return self._start(packets, self.content_timeout if content else self.command_timeout)

    def end_of_message(self, packets: Sequence[bytes]) -> defer.Deferred[EndOfMessage]:
        """Send the end of message; fire with the verdict and every modification before it."""
        self._eom = EndOfMessage(Response("continue"))
        return self._start(packets, self.content_timeout)

    def _start(self, packets: Sequence[bytes], timeout: float) -> defer.Deferred[Any]:
        if self.failed is not None:
            return defer.fail(MilterFailure(self.failed))
        if self._waiting is not None:
            return defer.fail(MilterFailure("a command is already waiting"))
        d: defer.Deferred[Any] = defer.Deferred()
        self._waiting = d
        self._timeout = timeout
        self._restart_timer()
        assert self.transport is not None
        self.transport.write(b"".join(packets))
        return d

    # -- answers -----------------------------------------------------------------

    def _restart_timer(self) -> None:
        self._stop_timer()
        self._timer = self.clock.callLater(self._timeout, self._timed_out)

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(f"no answer within {self._timeout:g}s")

    def _packet(self, command: bytes, payload: bytes) -> None:
        if self.failed is not None:
            return
        if self._waiting is None:
            raise MilterProtocolError(f"unsolicited reply {command!r}")
        if self._negotiating:
            if command != codec.OPTNEG:
                raise MilterProtocolError(f"reply {command!r} to options negotiation")
            self._negotiating = False
            self.negotiated = codec.parse_optneg(payload)
            self._fire(self.negotiated)
            return
        reply = codec.parse_reply(command, payload)
        if reply is None:  # SMFIR_PROGRESS: the deadline starts again
            self._restart_timer()
            return
        if isinstance(reply, Modification):
            self._modification(reply)
            return
        eom, self._eom = self._eom, None
        if eom is not None:
            eom.response = reply
            self._fire(eom)
        else:
            self._fire(reply)

    def _modification(self, change: Modification) -> None:
        eom = self._eom
        if eom is None:
            raise MilterProtocolError(f"modification {change.kind!r} outside end of message")
        negotiated = self.negotiated
        assert negotiated is not None
        if not negotiated.actions & _NEEDS[change.kind]:
            raise MilterProtocolError(f"modification {change.kind!r} was not negotiated")
        if change.kind == codec.REPLBODY:
            eom.body_size += len(change.data)
            if eom.body_size > self.max_body:
                raise MilterProtocolError(f"replacement body larger than {self.max_body} bytes")
            if eom.body is None:
                eom.body = tempfile.SpooledTemporaryFile(max_size=64 * 1024, dir=self.spill_dir)
            eom.body.write(change.data)
            return
        if len(eom.modifications) >= MAX_MODIFICATIONS:
            raise MilterProtocolError(f"more than {MAX_MODIFICATIONS} modifications")
        eom.changes_size += len(change.name) + len(change.value)
        if eom.changes_size > min(self.max_body, MAX_CHANGES_SIZE):
            raise MilterProtocolError("header and envelope changes too large")
        eom.modifications.append(change)

    def _fire(self, result: object) -> None:
        self._stop_timer()
        d, self._waiting = self._waiting, None
        assert d is not None
        d.callback(result)


class _Factory(protocol.Factory):
    noisy = False  # no "Starting factory" line per connection

    def __init__(self, proto: MilterProtocol) -> None:
        self.proto = proto

    def buildProtocol(self, addr: Any) -> MilterProtocol:
        return self.proto


def open_milter(
    connect: Callable[[protocol.Factory], defer.Deferred[Any]],
    proto: MilterProtocol,
    connect_timeout: float,
) -> defer.Deferred[MilterProtocol]:
    """
    Connect (through C{connect}, e.g. an endpoint's C{connect}) within
    C{connect_timeout} seconds and negotiate; fire with the ready
    protocol, or fail with L{MilterFailure}.
    """
    d = connect(_Factory(proto))
    clock = proto.clock
    timer = clock.callLater(connect_timeout, d.cancel)

    def connected(_: object) -> defer.Deferred[Negotiated]:
        if timer.active():
            timer.cancel()
        return proto.negotiate()

    def failed(f: Any) -> None:
        if timer.active():
            timer.cancel()
        if f.check(MilterFailure):
            raise f.value
        if f.check(defer.CancelledError):
            raise MilterFailure(f"cannot connect within {connect_timeout:g}s")
        raise MilterFailure(f"cannot connect: {f.getErrorMessage()}"[:300])

    d.addCallback(connected)
    d.addCallbacks(lambda _: proto, failed)
    return d


def endpoint(reactor: Any, socket: str) -> Any:
    """
    The client endpoint of a milter socket: C{unix:/path}, or
    C{inet:host:port} (C{inet:[v6]:port}); a host that is no address is
    resolved by the reactor's resolver (L{HostnameEndpoint}).
    """
    from twisted.internet.abstract import isIPAddress, isIPv6Address
    from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, UNIXClientEndpoint

    kind, _, rest = socket.partition(":")
    if kind == "unix":
        return UNIXClientEndpoint(reactor, rest)
    host, _, port = rest.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, int(port))
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, int(port))
    return HostnameEndpoint(reactor, host, int(port))
