"""
The PROXY protocol (HAProxy, versions 1 and 2) in front of an SMTP
listener: which connections must start with a PROXY header and reading
it.

Owns: L{ProxyGate} (C{server.proxy_from}: whether a peer is a proxy, and
the header deadline C{server.proxy_timeout}) and L{ProxyHeaderReader}
(the bytes of one connection until its header is complete: parsed by
Twisted's own PROXY parsers, C{twisted.protocols.haproxy}, with the checks
they leave out -- a size bound, a source that is an IP address, no
exception escaping -- and the bytes after the header handed back).  A
header that names no source (v1 C{UNKNOWN}, v2 C{LOCAL}: the proxy's own
health checks) leaves the connection's own address.

Also the log line of a header that failed (L{log_header_failure}), the
same on every listener.

Must not touch: the session (it is told the address, or that the header
failed, through two callables), the relay decision or any limit (they all
read the address the session is given).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser

from mailhub.maillog import mail_event

__all__ = ["ProxyGate", "ProxyHeaderReader", "log_header_failure", "MAX_V1", "MAX_V2"]

#: A v1 header line is at most 107 octets with its CRLF (the specification's bound).
MAX_V1 = 107
#: A v2 header: 16 octets and at most this many more (addresses and TLVs; HAProxy sends far fewer).
MAX_V2 = 1024

_V2_SIGNATURE = V2Parser.PREFIX
_V1_SIGNATURE = b"PROXY "


class ProxyHeaderReader:
    """
    Reads one connection's PROXY header.

    @param peer: the connection's own address (the proxy's).
    @param done: C{done(client_address, rest)} once the header is complete.
    @param failed: C{failed(why)} when it is missing, malformed, too long or late.
    """

    def __init__(
        self, peer: str, clock: IReactorTime, timeout: float,
        done: Callable[[str, bytes], None], failed: Callable[[str], None],
    ) -> None:
        self.peer = peer
        self._done = done
        self._failed = failed
        self._buf = b""
        self._timer: IDelayedCall | None = clock.callLater(timeout, self._late)

    def stop(self) -> None:
        """The connection is gone: no more callbacks."""
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _late(self) -> None:
        self._timer = None
        self._failed("no PROXY header in time")

    def _fail(self, why: str) -> None:
        self.stop()
        self._failed(why)

    def feed(self, data: bytes) -> None:
        if self._timer is None:
            return
        buf = self._buf = self._buf + data
        if buf.startswith(_V2_SIGNATURE[: len(buf)]) and len(buf) < 12:
            return  # maybe v2, maybe not: wait for the signature
        if buf.startswith(_V2_SIGNATURE):
            self._v2(buf)
        elif _V1_SIGNATURE.startswith(buf[:6]):
            self._v1(buf)
        else:
            self._fail("the connection does not start with a PROXY header")

    def _v1(self, buf: bytes) -> None:
        end = buf.find(b"\r\n")
        if end < 0:
            if len(buf) >= MAX_V1:
                self._fail("PROXY v1 header longer than 107 octets")
            return
        if end + 2 > MAX_V1:
            self._fail("PROXY v1 header longer than 107 octets")
            return
        line = buf[:end]
        if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
            # the specification's "anything after UNKNOWN is ignored" (Twisted's parser wants more)
            self._buf = b""
            self.stop()
            self._done(self.peer, buf[end + 2 :])
            return
        self._parsed(V1Parser(), buf[: end + 2])

    def _v2(self, buf: bytes) -> None:
        if len(buf) < 16:
            return
        size = 16 + int.from_bytes(buf[14:16], "big")
        if size > 16 + MAX_V2:
            self._fail(f"PROXY v2 header of {size} octets (at most {16 + MAX_V2})")
            return
        if len(buf) < size:
            return
        self._parsed(V2Parser(), buf[:size])

    def _parsed(self, parser: V1Parser | V2Parser, header: bytes) -> None:
        rest = self._buf[len(header) :]
        self._buf = b""
        try:
            info, _ = parser.feed(header)
            source = None if info is None else info.source
            host = getattr(source, "host", None) if source is not None else None
            if source is not None and host is None:
                raise ValueError("not an IP source")
            client = self.peer if host is None else str(ipaddress.ip_address(host))
        except Exception:  # the parsers let ValueError, UnicodeDecodeError... through
            self._fail("malformed PROXY header")
            return
        self.stop()
        self._done(client, rest)


def log_header_failure(proxy: str, why: str, listener: str) -> None:
    """The log line and C{reject} event for a proxy's connection closed for its header."""
    mail_event(
        "reject",
        "NOQUEUE: reject: CONNECT from proxy [{client}]: {why}; closing; listener={listener}",
        client=proxy, why=why, listener=listener, reason="proxy_header",
    )


class ProxyGate:
    """
    C{server.proxy_from}: the networks whose connections must start with a
    PROXY header, and the time they have for it.
    """

    def __init__(self, networks: Iterable[str], timeout: float, clock: IReactorTime) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]
        self.timeout = timeout
        self.clock = clock

    def __bool__(self) -> bool:
        return bool(self.networks)

    def expects(self, peer: str) -> bool:
        """Whether a connection from C{peer} must start with a PROXY header."""
        try:
            addr = ipaddress.ip_address(peer)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in n for n in self.networks)

    def reader(self, peer: str, done: Callable[[str, bytes], None], failed: Callable[[str], None]) -> ProxyHeaderReader:
        return ProxyHeaderReader(peer, self.clock, self.timeout, done, failed)
