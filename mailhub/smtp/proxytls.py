"""
The PROXY header on implicit-TLS listeners (C{server.smtps}): a proxy in
TCP mode (HAProxy's C{send-proxy} / C{send-proxy-v2}) sends the header in
clear, before the TLS handshake, so it is read beneath the TLS layer.

Owns: L{ProxyBeneathTLSFactory}, the wrapper put between the plain
listening endpoint and the TLS layer (L{mailhub.tls.implicit_tls_endpoint}'s
C{beneath}), and its per-connection L{ProxyBeneathTLS}.  A connection from
a network of C{server.proxy_from} gives its header to a
L{mailhub.smtp.proxyheader.ProxyHeaderReader}; only then is the TLS layer
(and the SMTP session inside it) built and connected, its C{getPeer()}
naming the client and its C{proxied_by} the proxy; the bytes after the
header (the client's TLS hello) go to it.  A missing, malformed, oversize
or late header closes the connection with the same log line and
C{reject} event as on plain listeners (L{log_header_failure}); nothing is
said in SMTP or TLS.  A connection from anyone else is handed to the TLS
layer at once; if its first bytes are a PROXY signature it is closed with
a log line (C{reason=proxy_refused}): an SMTP reply cannot be given
before TLS.

Must not touch: the bytes after the header (passed on unchanged), TLS
itself (the layer above), the session (it reads C{proxied_by} through its
transport, L{mailhub.smtp.gates.Gates.connection_made}).
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IProtocolFactory, ITransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from mailhub.maillog import mail_event
from mailhub.smtp.proxyheader import ProxyGate, ProxyHeaderReader, log_header_failure

__all__ = ["ProxyBeneathTLSFactory", "ProxyBeneathTLS"]

_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_SIGNATURE = b"PROXY "


def _client_address(client: str, peer: IAddress) -> IAddress:
    """The address the layers above see: the client's (port unknown: 0), or the peer's if the header named none."""
    if client == getattr(peer, "host", None):
        return peer
    return IPv6Address("TCP", client, 0) if ":" in client else IPv4Address("TCP", client, 0)


class ProxyBeneathTLS(ProtocolWrapper):
    """
    One raw connection to an implicit-TLS listener that reads PROXY headers.
    The wrapped protocol (the TLS layer) is built when the connection may
    be served: at once for a peer that is no proxy, after the header for a
    proxy.
    """

    factory: ProxyBeneathTLSFactory
    #: the proxy's address once its header named a client: read by the session
    proxied_by: str | None = None

    def __init__(self, factory: ProxyBeneathTLSFactory, addr: IAddress) -> None:
        super().__init__(factory, None)  # type: ignore[arg-type]
        self._addr = addr
        self._client_addr: IAddress | None = None
        self._reader: ProxyHeaderReader | None = None
        self._sniff = b""  # the first bytes of a non-proxy peer, while they may be a PROXY signature
        self._sniffing = False

    @property
    def _raw(self) -> Any:
        """The raw connection (set by makeConnection)."""
        assert self.transport is not None
        return self.transport

    def makeConnection(self, transport: ITransport) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)

    def connectionMade(self) -> None:
        peer = getattr(self._raw.getPeer(), "host", "")
        gate = self.factory.gate
        if gate.expects(peer):
            self._reader = gate.reader(peer, self._proxied, self._failed)
            return
        self._sniffing = True
        self._serve(None)

    def _serve(self, client_addr: IAddress | None) -> None:
        self._client_addr = client_addr
        self.wrappedProtocol = self.factory.wrappedFactory.buildProtocol(client_addr or self._addr)
        if self.wrappedProtocol is None:
            self._raw.loseConnection()
            return
        self.wrappedProtocol.makeConnection(cast(ITransport, self))

    def _proxied(self, client: str, rest: bytes) -> None:
        self._reader = None
        peer = self._raw.getPeer()
        self.proxied_by = getattr(peer, "host", "")
        self._serve(_client_address(client, peer))
        if rest and self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(rest)

    def _failed(self, why: str) -> None:
        self._reader = None
        log_header_failure(getattr(self._raw.getPeer(), "host", ""), why, self.factory.listener)
        self._raw.loseConnection()

    def getPeer(self) -> IAddress:
        return self._client_addr if self._client_addr is not None else self._raw.getPeer()

    def dataReceived(self, data: bytes) -> None:
        if self._reader is not None:
            self._reader.feed(data)
        elif self._sniffing:
            self._sniff_proxy(data)
        elif self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)

    def _sniff_proxy(self, data: bytes) -> None:
        buf = self._sniff + data
        if buf.startswith(_V2_SIGNATURE) or buf.startswith(_V1_SIGNATURE):
            self._sniffing = False
            self._refuse()
            return
        if _V2_SIGNATURE.startswith(buf) or _V1_SIGNATURE.startswith(buf):
            self._sniff = buf  # may still become a signature
            return
        self._sniffing = False
        self._sniff = b""
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(buf)

    def _refuse(self) -> None:
        mail_event(
            "reject",
            "NOQUEUE: reject: PROXY from [{client}]: PROXY header not accepted from your address; "
            "closing; listener={listener}",
            client=getattr(self._raw.getPeer(), "host", ""), listener=self.factory.listener,
            reason="proxy_refused",
        )
        self._raw.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.stop()
        self.factory.unregisterProtocol(self)
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.connectionLost(reason)
            self.wrappedProtocol = None  # type: ignore[assignment]


class ProxyBeneathTLSFactory(WrappingFactory):
    """
    Wraps the TLS layer's factory of one implicit-TLS listener.

    @param wrapped: the TLS layer's factory (its protocol is built per
        connection when the connection may be served).
    @param gate: C{server.proxy_from} and C{server.proxy_timeout}.
    @param listener: the listener's kind, for the log lines (C{smtps}).
    """

    protocol = ProxyBeneathTLS

    def __init__(self, wrapped: IProtocolFactory, gate: ProxyGate, listener: str = "smtps") -> None:
        super().__init__(wrapped)
        self.gate = gate
        self.listener = listener

    def buildProtocol(self, addr: Any) -> ProxyBeneathTLS:
        return ProxyBeneathTLS(self, addr)
