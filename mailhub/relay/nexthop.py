"""
Next hops and DNS servers as the configuration writes them: pure parsing,
no I/O, no reactor, so loading a configuration does not import the SMTP
client, twisted.names or OpenSSL.

Owns: the syntax of a route value or smarthost (C{host}, C{host:port},
C{[host]}, C{[host]:port}, optionally C{smtp:}: Postfix's brackets mean
"no MX lookup"), of a DNS server (C{ip[:port]}), and the L{Destination} a
next hop becomes.  Must not touch: DNS lookups, connections (that is
L{mailhub.relay.agent}).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from mailhub.address import AddressError, normalize_domain

__all__ = ["Destination", "parse_nexthop", "parse_dns_server"]


@dataclass(frozen=True)
class Destination:
    """
    A next hop: where connections go and the key for concurrency limits and
    connection reuse.

    @ivar host: a domain whose MX records are looked up (C{mx=True}), or a
        host name / IP address used directly (C{mx=False}).
    @ivar port: TCP port.
    @ivar mx: look up MX records for C{host} (no brackets in a route).
    @ivar explicit: comes from C{routes} or C{smarthost}: the operator chose
        it, so a loopback address is not a mail loop.
    """

    host: str
    port: int
    mx: bool = True
    explicit: bool = False

    def __str__(self) -> str:
        host = f"[{self.host}]" if not self.mx else self.host
        return f"{host}:{self.port}"


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def parse_nexthop(value: str, default_port: int = 25) -> Destination | None:
    """
    Parse a route value or smarthost: C{host}, C{host:port}, C{[host]},
    C{[host]:port}, optionally prefixed with C{smtp:} (Postfix transport
    syntax).  Brackets (or an IP address) mean no MX lookup.  IPv6
    addresses must be bracketed.  An empty value (or C{smtp:}) returns
    C{None}: deliver as usual through the recipient domain's MX records,
    which lets a route exempt a domain from the smarthost.

    @raise ValueError: on a malformed value (config validation uses this).
    """
    v = value.strip()
    if v.lower().startswith("smtp:"):
        v = v[5:]
    if v in ("", ":"):
        return None
    if v.startswith("["):
        end = v.find("]")
        if end < 0:
            raise ValueError(f"unbalanced brackets in next hop {value!r}")
        host, rest, mx = v[1:end], v[end + 1 :], False
        if host.lower().startswith("ipv6:"):
            host = host[5:]
    else:
        if v.count(":") > 1:
            raise ValueError(f"IPv6 next hop must be bracketed: {value!r}")
        host, sep, port_text = v.partition(":")
        rest, mx = (":" + port_text) if sep else "", True
    if rest:
        if not rest.startswith(":") or not rest[1:].isdigit():
            raise ValueError(f"bad port in next hop {value!r}")
        port = int(rest[1:])
    else:
        port = default_port
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in next hop {value!r}")
    ip = _ip(host)
    if ip is not None:
        return Destination(ip.compressed, port, mx=False, explicit=True)
    try:
        host = normalize_domain(host)
    except AddressError as e:
        raise ValueError(f"bad host in next hop {value!r}: {e}") from None
    return Destination(host, port, mx=mx, explicit=True)


def parse_dns_server(value: str) -> tuple[str, int]:
    """C{"192.0.2.53"}, C{"192.0.2.53:5353"} or C{"[2001:db8::53]:53"} -> (ip, port)."""
    v = value.strip()
    port = 53
    if v.startswith("["):
        end = v.find("]")
        host, rest = v[1:end], v[end + 1 :]
        if rest:
            port = int(rest.lstrip(":"))
    elif v.count(":") == 1:
        host, _, p = v.partition(":")
        port = int(p)
    else:
        host = v
    ip = _ip(host)
    if ip is None or not 0 < port < 65536:
        raise ValueError(f"DNS server must be an IP address[:port], got {value!r}")
    return ip.compressed, port


def _route_key(key: str) -> str:
    if key.startswith("."):
        return "." + normalize_domain(key[1:])
    return normalize_domain(key)
