"""
Local delivery through LMTP (RFC 2033): the delivery agent that hands
local recipients to an LMTP server (Dovecot, Cyrus) instead of writing
Maildirs, with C{local.transport = "lmtp:unix:/path"} or
C{"lmtp:inet:host:port"} (docs/delivery.rst, "LMTP").

Owns: L{LMTPDelivery} (the agent: C{deliver} fires with one outcome per
recipient and never fails), the endpoint named by C{local.transport}
(L{lmtp_endpoint}), the connections: at most C{max_connections} at once,
idle ones kept C{idle_timeout} seconds for the next message and closed
with QUIT after it, a reused connection that turns out to be closed
replaced by a new one before anything was said about the message.

Must not touch: the LMTP conversation (L{mailhub.delivery.lmtpclient}),
retry decisions (the scheduler's), mailboxes (the LMTP server's).
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from mailhub.delivery.lmtpclient import LMTPClient
from mailhub.envelope import Envelope, Outcome, Recipient, ReportFunction
from mailhub.relay.reply import ConnectionBroken

__all__ = ["LMTPDelivery", "lmtp_endpoint", "lmtp_name"]

log = Logger()


def lmtp_name(transport: str) -> str:
    """How outcomes and logs name the server of C{transport}: C{unix:/path} or C{host:port}."""
    where = transport.removeprefix("lmtp:")
    return where.removeprefix("inet:")


def lmtp_endpoint(reactor: Any, transport: str, timeout: float) -> Any:
    """
    The client endpoint of C{transport} (C{lmtp:unix:/path} or
    C{lmtp:inet:host:port}, as L{mailhub.configcheck.local_transport} checked it).
    """
    where = transport.removeprefix("lmtp:")
    family, _, rest = where.partition(":")
    if family == "unix":
        return UNIXClientEndpoint(reactor, rest, timeout=timeout)
    if family == "inet":
        host, _, port = rest.rpartition(":")
        return HostnameEndpoint(reactor, host.removeprefix("[").removesuffix("]"), int(port), timeout=timeout)
    raise ValueError(f"not an LMTP transport: {transport!r}")


class LMTPDelivery(service.Service):
    """
    The local delivery agent of C{local.transport = "lmtp:..."}.

    @param reactor: for connecting and for time.
    @param transport: the C{local.transport} value.
    @param hostname: said in LHLO.
    @param endpoint: overrides the endpoint made from C{transport} (tests).
    """

    def __init__(
        self,
        reactor: Any,
        transport: str,
        hostname: str,
        *,
        max_connections: int = 4,
        connect_timeout: float = 30.0,
        timeout: float = 300.0,
        data_timeout: float = 600.0,
        idle_timeout: float = 30.0,
        endpoint: Any = None,
    ) -> None:
        self.reactor = reactor
        self.server = lmtp_name(transport)
        self.hostname = hostname
        self.timeout = timeout
        self.data_timeout = data_timeout
        self.idle_timeout = idle_timeout
        self.endpoint = endpoint if endpoint is not None else lmtp_endpoint(reactor, transport, connect_timeout)
        self._slots = defer.DeferredSemaphore(max_connections)
        self._idle: list[tuple[LMTPClient, IDelayedCall]] = []

    # -- the agent ------------------------------------------------------------------

    def deliver(
        self, envelope: Envelope, recipients: list[Recipient], message_path: str, report: ReportFunction
    ) -> Deferred[list[Outcome]]:
        """One LMTP transaction for C{recipients}; one outcome each (the contract of L{mailhub.envelope.DeliveryAgent})."""
        d = self._slots.run(lambda: defer.ensureDeferred(self._deliver(envelope, recipients, message_path)))

        def crashed(f: Any) -> list[Outcome]:
            log.failure("{queue_id}: LMTP delivery crashed", f, queue_id=envelope.queue_id)
            text = f"LMTP delivery error: {f.getErrorMessage()}"[:300]
            return [Outcome.temporary(r.address, text, 0, "4.3.0") for r in recipients]

        return d.addErrback(crashed)

    async def _deliver(self, envelope: Envelope, recipients: list[Recipient], message_path: str) -> list[Outcome]:
        conn = self._take_idle()
        if conn is not None:
            outcomes = await conn.transaction(envelope, recipients, message_path)
            self._done_with(conn)
            if conn.mail_answered:
                return outcomes
            # The idle connection was gone (the server closed it) before MAIL
            # was answered: nothing about this message happened, use a new one.
        try:
            conn = await self._connect()
        except ConnectionBroken as e:
            log.info("LMTP: cannot deliver to {name}: {why}", name=self.server, why=e.text)
            return [Outcome.temporary(r.address, e.text, e.code, e.enhanced) for r in recipients]
        outcomes = await conn.transaction(envelope, recipients, message_path)
        self._done_with(conn)
        return outcomes

    # -- connections -----------------------------------------------------------------

    async def _connect(self) -> LMTPClient:
        client = LMTPClient(self.reactor, self.hostname, self.server, self.timeout, self.data_timeout)
        try:
            await self.endpoint.connect(_Once(client))
        except Exception as e:
            raise ConnectionBroken(f"connect to {self.server} failed: {e}"[:300], "4.4.1") from e
        await client.ready  # fails with ConnectionBroken: the greeting or LHLO went wrong
        return client

    def _take_idle(self) -> LMTPClient | None:
        while self._idle:
            conn, timer = self._idle.pop()
            if timer.active():
                timer.cancel()
            if conn.usable:
                return conn
        return None

    def _done_with(self, conn: LMTPClient) -> None:
        if not conn.usable or not self.running:
            conn.quit() if conn.usable else conn.abort("not reused")
            return
        timer = self.reactor.callLater(self.idle_timeout, self._expire, conn)
        self._idle.append((conn, timer))

    def _expire(self, conn: LMTPClient) -> None:
        self._idle = [(c, t) for c, t in self._idle if c is not conn]
        conn.quit()

    def stopService(self) -> Deferred[None]:
        """QUIT every idle connection."""
        super().stopService()
        idle, self._idle = self._idle, []
        for conn, timer in idle:
            if timer.active():
                timer.cancel()
            conn.quit()
        return defer.succeed(None)

    @property
    def idle(self) -> int:
        """Idle connections kept for the next message."""
        return len(self._idle)


class _Once(Factory):
    """Hands the one prepared client to the endpoint."""

    def __init__(self, client: LMTPClient) -> None:
        self.client = client

    def buildProtocol(self, addr: Any) -> LMTPClient:
        return self.client
