"""
SPF (RFC 7208) of a message's MAIL FROM (or HELO) identity, with pyspf.

Owns: running pyspf for one client (L{check_spf}) with its DNS answered by
L{mailhub.auth.dns.AuthDNS} (pyspf's one DNS hook, C{spf.DNSLookup}, is
pointed at this module's dispatcher, which answers for the thread that
runs a check and falls back to pyspf's own lookup anywhere else), and the
result's words.  pyspf does the record parsing, the macros, the ten-lookup
and void-lookup limits.

Must not touch: the reactor thread (checks run in a worker thread; the
DNS bridge waits there), the message, replies.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import spf

from mailhub.auth.dns import Answer, DNSTempError

__all__ = ["SPFResult", "check_spf", "RESULTS", "Lookup"]

#: The results RFC 7208 2.6 defines (pyspf's words are the same).
RESULTS = ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror")
#: Seconds all the queries of one check may take together (RFC 7208 4.6.4 says at least 20).
QUERY_TIME = 20

#: A blocking DNS lookup: (name, type) -> answer, raising DNSTempError.
Lookup = Callable[[str, str], Answer]

_local = threading.local()
_original_lookup = spf.DNSLookup


def _dispatch(name: str, qtype: str, strict: Any = True, timeout: Any = None) -> list[tuple[tuple[str, str], Any]]:
    lookup: Lookup | None = getattr(_local, "lookup", None)
    if lookup is None:
        return _original_lookup(name, qtype, strict, timeout)
    try:
        answer = lookup(name, qtype)
    except DNSTempError as e:
        raise spf.TempError(f"DNS {e}") from e
    out: list[tuple[tuple[str, str], Any]] = []
    for owner, kind, value in answer:
        out.append(((owner, kind), value))
    return out


spf.DNSLookup = _dispatch


@dataclass(frozen=True)
class SPFResult:
    """
    @ivar result: one of L{RESULTS}.
    @ivar identity: C{mailfrom} or C{helo} (the null sender is checked by its HELO name).
    @ivar domain: the domain checked.
    @ivar value: the identity as the header names it (the address, or the HELO name).
    @ivar reason: pyspf's explanation, cut.
    """

    result: str
    identity: str
    domain: str
    value: str
    reason: str = ""


def check_spf(lookup: Lookup, ip: str, sender: str, helo: str) -> SPFResult:
    """
    SPF of C{sender} (the HELO name C{helo} when the sender is null) for
    a client at C{ip}; run in a worker thread, C{lookup} the DNS bridge.
    """
    helo = (helo or "").strip()
    if sender:
        identity, value, domain = "mailfrom", sender, sender.rpartition("@")[2]
    else:
        identity, value, domain = "helo", helo, helo
    if not domain or not ip:
        return SPFResult("none", identity, domain, value, "no identity to check")
    _local.lookup = lookup
    try:
        q = spf.query(i=ip, s=sender or f"postmaster@{helo}", h=helo or domain, querytime=QUERY_TIME)
        result, _code, reason = q.check()
    except (ValueError, UnicodeError) as e:  # an address pyspf cannot use at all
        result, reason = "permerror", str(e)
    finally:
        _local.lookup = None
    result = result.lower()
    if result not in RESULTS:  # pyspf's "ambiguous" and the like: treat as an error of the record
        result = "permerror"
    return SPFResult(result, identity, domain.lower(), value, str(reason)[:200])
