"""
The TLS policy of each outbound connection: which protection a next hop's
MX host must give before mail is sent to it, and why.

Owns: the precedence of the policy sources -- the C{[relay.tls_policy]}
table (Postfix C{smtp_tls_policy_maps}), then DANE (RFC 7672), then
MTA-STS (RFC 8461), then C{relay.tls} -- the L{DomainPolicy} of a next hop
and the L{HostPolicy} of each MX host (the client's TLS level, TLSA
records, MX hosts refused), and the C{verified=} word of the log
(L{verified}).

Discovery (DANE, MTA-STS) applies to next hops found by an MX lookup: the
recipient domain, or a route written C{domain} / C{domain:port}.  The
table is looked up with the next hop's domain (exact, then C{.parent}
entries) and overrides what was discovered.

Must not touch: DNS queries and the policy fetch (L{mailhub.relay.dane},
L{mailhub.relay.mtasts}), connections (L{mailhub.relay.agent},
L{mailhub.relay.client}), reporting (L{mailhub.relay.tlsrpt}).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from mailhub.relay.dane import TLSA, DaneLookup, DNSFailure
from mailhub.relay.mtasts import MTASTS, CachedPolicy
from mailhub.relay.nexthop import Destination

__all__ = ["TABLE_LEVELS", "DomainPolicy", "HostPolicy", "TLSPolicy", "verified", "table_key"]

log = Logger()

#: Values of the [relay.tls_policy] table.
TABLE_LEVELS = ("none", "may", "encrypt", "verify", "dane", "dane-only")
_DANE_LEVELS = ("dane", "dane-only")


@dataclass(frozen=True)
class DomainPolicy:
    """What is known about a next hop's domain before any host is tried."""

    domain: str
    table: str | None  # the table's level for it
    sts: CachedPolicy | None  # the MTA-STS policy in force (enforce or testing)
    mx_secure: bool  # DANE applies: the MX RRset validated
    dane: bool  # DANE lookups are to be made

    @property
    def source(self) -> str:
        if self.table is not None:
            return "table"
        if self.sts is not None:
            return "mta-sts"
        return "default"


@dataclass(frozen=True)
class HostPolicy:
    """
    What one MX host must give.

    @ivar tls: the client's level (none, may, encrypt, verify).
    @ivar source: C{table}, C{dane}, C{mta-sts} or C{default}.
    @ivar tlsa: the usable TLSA records (DANE).
    @ivar observe: MTA-STS testing: verify and report, do not enforce.
    @ivar refuse: not empty: do not connect to this host, for this reason.
    @ivar warning: MTA-STS testing: what would have refused the host.
    @ivar report_type: TLS-RPT policy type: C{tlsa}, C{sts} or C{no-policy-found}.
    """

    tls: str
    source: str
    tlsa: tuple[TLSA, ...] = ()
    observe: bool = False
    refuse: str = ""
    warning: str = ""
    result_type: str = ""  # TLS-RPT result type of a refusal

    @property
    def report_type(self) -> str:
        if self.tlsa or self.result_type in ("tlsa-invalid", "dnssec-invalid", "dane-required"):
            return "tlsa"
        if self.source == "mta-sts":
            return "sts"
        return "no-policy-found"


def table_key(table: Mapping[str, str], domain: str) -> str | None:
    """The table's level for C{domain}: the exact entry, then the nearest C{.parent} entry."""
    if domain in table:
        return table[domain]
    labels = domain.split(".")
    for i in range(1, len(labels)):
        key = "." + ".".join(labels[i:])
        if key in table:
            return table[key]
    return None


def verified(host: HostPolicy | None, info: dict[str, Any]) -> str:
    """
    The C{verified=} word: C{dane} (a TLSA record matched), C{mta-sts} (the
    chain and name verified under an enforced MTA-STS policy), C{pkix}
    (verified under level C{verify} from the table or C{relay.tls}), or
    C{none}.
    """
    if not info.get("version"):
        return "none"
    if info.get("dane"):
        return "dane"
    if host is not None and host.tls == "verify" and info.get("pkix_error") is None:
        return "mta-sts" if host.source == "mta-sts" else "pkix"
    return "none"


class TLSPolicy:
    """
    The policy sources together.

    @param default: C{relay.tls}.
    @param table: C{[relay.tls_policy]}, normalised domain -> level.
    @param dane: the DANE lookups, or None when C{relay.dane} is off.
    @param mtasts: the MTA-STS policies, or None when C{relay.mta_sts} is off.
    """

    def __init__(self, default: str = "may", table: Mapping[str, str] | None = None,
                 dane: DaneLookup | None = None, mtasts: MTASTS | None = None) -> None:
        self.default = default
        self.table = dict(table or {})
        for k, v in self.table.items():
            if v not in TABLE_LEVELS:
                raise ValueError(f"tls_policy: {k}: level must be one of {', '.join(TABLE_LEVELS)}, not {v!r}")
        self.dane = dane
        self.mtasts = mtasts

    async def for_destination(self, dest: Destination) -> DomainPolicy:
        """The L{DomainPolicy} of next hop C{dest}; never raises."""
        level = table_key(self.table, dest.host)
        discover = dest.mx and (level is None or level in _DANE_LEVELS)
        use_dane = discover and self.dane is not None and self.dane.trusted
        mx_secure = False
        # the MTA-STS lookup runs while DANE's is answered (its Deferred never fails)
        pending = self.mtasts.policy(dest.host) if discover and level is None and self.mtasts is not None else None
        if use_dane:
            assert self.dane is not None
            try:
                mx_secure = await self.dane.mx_secure(dest.host)
            except DNSFailure as e:
                log.info("DNSSEC MX lookup for {domain} failed: {error}", domain=dest.host, error=str(e))
        sts = await pending if pending is not None else None
        return DomainPolicy(dest.host, level, sts, mx_secure, use_dane and mx_secure)

    async def for_host(self, dp: DomainPolicy, host: str, port: int) -> HostPolicy:
        """The L{HostPolicy} of MX host C{host} (connected to on C{port}) of C{dp}; never raises."""
        level = dp.table
        if level is not None and level not in _DANE_LEVELS:
            return HostPolicy(level, "table")
        if dp.dane and self.dane is not None and await self.dane.host_secure(host):
            # RFC 7672 2.2.2: TLSA records only for a host whose addresses validated
            try:
                answer = await self.dane.tlsa(host, port)
            except DNSFailure as e:
                # RFC 7672 2.2: a secure MX host whose TLSA lookup fails is not used.
                return HostPolicy("encrypt", "dane", refuse=f"TLSA lookup for _{port}._tcp.{host} failed ({e})",
                                  result_type="dnssec-invalid")
            if answer.usable:
                return HostPolicy("encrypt", "dane", tlsa=answer.records)
        if level == "dane-only":
            return HostPolicy("encrypt", "table", refuse=f"no usable DNSSEC-validated TLSA records for {host}",
                              result_type="dane-required")
        if level == "dane":
            return HostPolicy("may", "table")
        sts = dp.sts
        if sts is not None:
            allowed = sts.policy.allows(host)
            if sts.policy.mode == "enforce":
                if not allowed:
                    return HostPolicy("verify", "mta-sts",
                                      refuse=f"MX host {host} does not match the MTA-STS policy of {dp.domain}",
                                      result_type="validation-failure")
                return HostPolicy("verify", "mta-sts")
            base = self.default if self.default != "none" else "may"
            warning = "" if allowed else f"MX host {host} does not match the MTA-STS policy of {dp.domain}"
            return HostPolicy(base, "mta-sts", observe=True, warning=warning)
        return HostPolicy(self.default, "default")
