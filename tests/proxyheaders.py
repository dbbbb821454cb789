"""PROXY protocol headers for the tests: the proxy's address and v2 headers built by hand."""

from __future__ import annotations

import socket
import struct

PROXY_IP = "10.0.0.5"
V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(src: str, dst: str = "192.0.2.25", sport: int = 50000, dport: int = 25, command: int = 1) -> bytes:
    """A v2 header, TCP over IPv4 (C{command} 0: LOCAL)."""
    addrs = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return V2_SIG + bytes([0x20 | command, 0x11]) + struct.pack("!H", len(addrs)) + addrs


def v2_ipv6(src: str, dst: str = "2001:db8::25") -> bytes:
    """A v2 header, TCP over IPv6."""
    addrs = socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst) + struct.pack("!HH", 1, 25)
    return V2_SIG + b"\x21\x21" + struct.pack("!H", len(addrs)) + addrs
