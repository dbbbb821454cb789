"""
DNS for the authentication tests (not a test file): TXT records for
tests/dnszone.py's L{Zone}, and L{ZoneDNS}, an L{AuthDNS} whose blocking
bridge answers at once from a zone that answers synchronously, so the
checks run in the test's thread without a reactor.  Holds no assertions
beyond the synchronous-answer precondition.
"""

from __future__ import annotations

from twisted.names import dns
from twisted.python.failure import Failure

from mailhub.auth.dns import Answer, AuthDNS

__all__ = ["TXT", "ZoneDNS"]


def TXT(*texts: str, ttl: int = 60) -> dns.Record_TXT:
    return dns.Record_TXT(*[t.encode() for t in texts], ttl=ttl)


class ZoneDNS(AuthDNS):
    """AuthDNS whose blocking bridge resolves at once (the zone answers synchronously)."""

    def blocking(self, name: str, rtype: str) -> Answer:
        got: list = []
        self.lookup(name, rtype).addBoth(got.append)
        if not got:
            raise RuntimeError("the zone answered asynchronously")
        if isinstance(got[0], Failure):
            got[0].raiseException()
        return got[0]
