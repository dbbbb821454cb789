"""
Limits of the HTTP listener that a client cannot dodge: a header deadline,
a whole-request deadline, and connection caps per client address and in
total (as the SMTP listener's C{max_connections} and
C{max_connections_per_ip}).

Owns: L{ConnectionLimits} (the counters and the configuration) and
L{LimitedConnection}, a protocol wrapper around each HTTP channel that arms
the deadlines on the injected clock.  L{mailhub.web.api} builds them in
C{ApiSite.buildProtocol} and tells the wrapper when a request's header and
body are in (L{LimitedConnection.header_complete},
L{LimitedConnection.request_complete}) and when its answer is written
(L{LimitedConnection.answered}).

Deadlines run from the connection's start, and again from the end of each
answer on a kept-alive connection: the whole header must be in within
C{header_timeout} seconds and the whole request (header and body) within
C{request_timeout}, however slowly the bytes trickle in (one byte every 20
seconds resets Twisted's idle timeout, not these).  An expired deadline is
answered C{408} with the JSON error body and the connection is closed
(aborted C{ABORT_GRACE} seconds later if the client does not read).  No
deadline runs while mailhub itself works on a request (a spool commit).

A connection over a cap is answered C{503} (JSON body, C{Retry-After}) and
closed at once, and logged as a C{reject} mail event (reason
C{too_many_connections}, as the SMTP listener does).

Must not touch: requests' content, the API, the spool.
"""

from __future__ import annotations

import json
from typing import Any, cast

from twisted.internet.interfaces import IReactorTime, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure

from mailhub.maillog import mail_event

__all__ = ["ConnectionLimits", "LimitedConnection", "RefusedConnection", "ABORT_GRACE"]

log = Logger()

#: seconds between closing a timed-out connection and aborting it when the client does not read
ABORT_GRACE = 10.0


def _answer(status: int, reason: str, text: str, extra: str = "") -> bytes:
    body = json.dumps({"error": text, "code": status}).encode("utf-8") + b"\n"
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class ConnectionLimits:
    """
    The HTTP listener's limits and its open connections (per client
    address and in total).  One per site, shared by its listeners.
    """

    def __init__(
        self,
        clock: IReactorTime,
        header_timeout: float = 60.0,
        request_timeout: float = 300.0,
        max_connections: int = 100,
        max_connections_per_ip: int = 50,
    ) -> None:
        self.clock = clock
        self.header_timeout = header_timeout
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.max_connections_per_ip = max_connections_per_ip
        self.connections = 0
        self.per_ip: dict[str, int] = {}

    def over(self, ip: str) -> str | None:
        """The name of the limit a new connection from C{ip} would exceed, else C{None}."""
        if self.connections >= self.max_connections:
            return "max_connections"
        if self.per_ip.get(ip, 0) >= self.max_connections_per_ip:
            return "max_connections_per_ip"
        return None

    def add(self, ip: str) -> None:
        self.connections += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1

    def remove(self, ip: str) -> None:
        self.connections -= 1
        left = self.per_ip.get(ip, 1) - 1
        if left > 0:
            self.per_ip[ip] = left
        else:
            self.per_ip.pop(ip, None)


class RefusedConnection(Protocol):
    """Answers 503 (JSON, C{Retry-After}) and closes: the connection is over a limit."""

    def __init__(self, ip: str, limit: str) -> None:
        self.ip = ip
        self.limit = limit

    def connectionMade(self) -> None:
        mail_event(
            "reject",
            "NOQUEUE: reject: HTTP connect from [{client}]: 503 too many connections; limit={limit} listener={listener}",
            client=self.ip, code=503, text="too many connections", limit=self.limit, listener="http",
            reason="too_many_connections",
        )
        assert self.transport is not None
        self.transport.write(_answer(503, "Service Unavailable", "too many connections", "Retry-After: 60\r\n"))
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        pass


class _Registry:
    """What L{ProtocolWrapper} expects of its factory: the counting is done by L{LimitedConnection}."""

    def registerProtocol(self, p: Any) -> None:
        pass

    def unregisterProtocol(self, p: Any) -> None:
        pass


_REGISTRY = _Registry()


class LimitedConnection(ProtocolWrapper):
    """
    One HTTP connection (the Twisted channel it wraps) with the deadlines
    of L{ConnectionLimits}; counted in them from creation until lost.
    """

    def __init__(self, limits: ConnectionLimits, ip: str, wrapped: Any) -> None:
        super().__init__(_REGISTRY, wrapped)  # type: ignore[arg-type]
        self.limits = limits
        self.ip = ip
        self._header_call: Any = None
        self._request_call: Any = None
        self._abort_call: Any = None
        self._lost = False
        limits.add(ip)

    # -- deadlines ------------------------------------------------------------------

    def _arm(self) -> None:
        self._cancel()
        clock = self.limits.clock
        self._header_call = clock.callLater(self.limits.header_timeout, self._expired, "header", self.limits.header_timeout)
        self._request_call = clock.callLater(self.limits.request_timeout, self._expired, "request", self.limits.request_timeout)

    def _cancel(self, which: str = "both") -> None:
        if which in ("both", "header") and self._header_call is not None:
            if self._header_call.active():
                self._header_call.cancel()
            self._header_call = None
        if which in ("both", "request") and self._request_call is not None:
            if self._request_call.active():
                self._request_call.cancel()
            self._request_call = None

    def header_complete(self) -> None:
        """A request's whole header is in: its header deadline is met."""
        self._cancel("header")

    def request_complete(self) -> None:
        """A request's body is in too: mailhub works on it now, no deadline runs."""
        self._cancel()

    def answered(self) -> None:
        """A request was answered: the next one on this connection gets fresh deadlines."""
        if not self._lost and not self.disconnecting and not getattr(self.transport, "disconnecting", False):
            self._arm()

    def _expired(self, what: str, seconds: float) -> None:
        if what == "header":
            self._header_call = None
        else:
            self._request_call = None
        self._cancel()
        log.info(
            "HTTP: {what} not complete within {seconds:g} s from [{client}]: closing",
            what=what, seconds=seconds, client=self.ip,
        )
        transport = self.transport
        if transport is None or self._lost:
            return
        requests = getattr(getattr(self.wrappedProtocol, "_channel", None), "requests", [])
        if not any(getattr(r, "startedWriting", False) for r in requests):
            transport.write(_answer(408, "Request Timeout", f"{what} not complete within {seconds:g} seconds"))
        transport.loseConnection()
        self._abort_call = self.limits.clock.callLater(ABORT_GRACE, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        if not self._lost and self.transport is not None:
            cast(ITCPTransport, self.transport).abortConnection()

    # -- the protocol -----------------------------------------------------------------

    def makeConnection(self, transport: Any) -> None:
        self._arm()
        super().makeConnection(transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._lost:
            self._lost = True
            self._cancel()
            if self._abort_call is not None and self._abort_call.active():
                self._abort_call.cancel()
            self._abort_call = None
            self.limits.remove(self.ip)
        super().connectionLost(reason)
