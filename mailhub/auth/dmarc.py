"""
DMARC (RFC 7489): the policy of a message's C{From:} domain and whether
SPF or DKIM passed for an aligned domain.

Owns: the author domain of a header section (one C{From:} with one
address, else C{permerror}), the organizational domain (the Public Suffix
List, with the publicsuffixlist package and the list it ships), policy
discovery (C{_dmarc.FROM}, then C{_dmarc.ORG}; more or fewer than one
C{v=DMARC1} record there is no policy), the record's tags (C{p}, C{sp},
C{adkim}, C{aspf}, C{pct}; the tag-value syntax parsed by dkimpy's
parser), strict and relaxed alignment, and the result: C{pass}, C{fail},
C{none} (no policy), C{temperror}, C{permerror}, with the policy that
applies to this domain (C{sp} for a subdomain of the organizational
domain whose own record is missing).

No maintained library fits: authheaders (the one per-message DMARC
library) depends on publicsuffix2, unreleased since 2019, and ships its own
copy of the list, and cannot tell a DNS failure from a missing record;
checkdmarc audits a domain's records with its own resolver.  So this is
glue, about a hundred lines, over the libraries that parse.

Must not touch: the reactor thread (runs in a worker thread), replies and
enforcement (L{mailhub.auth.check} decides what a result does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from email import message_from_bytes
from email.policy import compat32
from email.utils import getaddresses

from dkim.util import InvalidTagValueList, parse_tag_value
from publicsuffixlist import PublicSuffixList

from mailhub.auth.dkimcheck import DKIMResult
from mailhub.auth.dns import DNSTempError
from mailhub.auth.spfcheck import SPFResult

__all__ = ["DMARCResult", "check_dmarc", "author_domain", "org_domain", "POLICIES"]

POLICIES = ("none", "quarantine", "reject")

_psl: PublicSuffixList | None = None


def org_domain(domain: str) -> str:
    """The organizational domain of C{domain} (RFC 7489 3.2): one label below its public suffix."""
    global _psl
    if _psl is None:
        _psl = PublicSuffixList()
    domain = domain.lower().rstrip(".")
    return _psl.privatesuffix(domain) or domain


def author_domain(header: bytes) -> tuple[str | None, str]:
    """The C{From:} domain of a header section, or (None, why there is none usable)."""
    msg = message_from_bytes(header, policy=compat32)
    values = [str(v) for v in (msg.get_all("From") or [])]
    if len(values) != 1:
        return None, f"{len(values)} From fields"
    addresses = [a for _n, a in getaddresses(values) if a]
    if len(addresses) != 1:
        return None, f"{len(addresses)} From addresses"
    local, at, domain = addresses[0].rpartition("@")
    domain = domain.strip().lower().rstrip(".")
    if not at or not local or not domain or "." not in domain:
        return None, "no domain in From"
    return domain, ""


@dataclass(frozen=True)
class DMARCResult:
    """
    @ivar result: pass, fail, none, temperror or permerror.
    @ivar from_domain: the C{From:} domain ("" when there is none usable).
    @ivar policy: what the domain asks for a failing message (none,
        quarantine, reject), "" without a policy.
    @ivar reason: why, for the header's comment.
    """

    result: str
    from_domain: str = ""
    policy: str = ""
    reason: str = ""


def _aligned(a: str, b: str, strict: bool) -> bool:
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    return a == b if strict else org_domain(a) == org_domain(b)


def _record(txt: Callable[[str], list[bytes]], domain: str) -> dict[bytes, bytes] | None:
    """The one DMARC record at C{_dmarc.domain}, None without exactly one. @raise DNSTempError."""
    records = [r for r in txt(f"_dmarc.{domain}") if r.lstrip().lower().startswith(b"v=dmarc1")]
    if len(records) != 1:
        return None
    try:
        tags = parse_tag_value(records[0])
    except InvalidTagValueList:
        return {}
    return {k.lower(): v.strip().lower() for k, v in tags.items()}


def check_dmarc(
    txt: Callable[[str], list[bytes]], header: bytes, spf: SPFResult, dkim: list[DKIMResult]
) -> DMARCResult:
    """The DMARC result of a message from its header section and its SPF and DKIM results."""
    domain, why = author_domain(header)
    if domain is None:
        return DMARCResult("permerror", "", "", why)
    org = org_domain(domain)
    try:
        tags = _record(txt, domain)
        at_org = False
        if tags is None and org != domain:
            tags = _record(txt, org)
            at_org = True
    except DNSTempError as e:
        return DMARCResult("temperror", domain, "", f"policy lookup: {e}")
    if tags is None:
        return DMARCResult("none", domain, "", "no policy")
    p = tags.get(b"p", b"").decode("ascii", "replace")
    sp = tags.get(b"sp", p.encode()).decode("ascii", "replace")
    if p not in POLICIES or sp not in POLICIES:
        return DMARCResult("permerror", domain, "", "invalid policy record")
    policy = sp if at_org else p
    strict_dkim = tags.get(b"adkim", b"r") == b"s"
    strict_spf = tags.get(b"aspf", b"r") == b"s"
    if any(r.result == "pass" and _aligned(r.domain, domain, strict_dkim) for r in dkim):
        return DMARCResult("pass", domain, policy, "dkim aligned")
    if spf.result == "pass" and _aligned(spf.domain, domain, strict_spf):
        return DMARCResult("pass", domain, policy, "spf aligned")
    temporary = (spf.result == "temperror" and _aligned(spf.domain, domain, strict_spf)) or any(
        r.result == "temperror" and _aligned(r.domain, domain, strict_dkim) for r in dkim
    )
    if temporary:
        return DMARCResult("temperror", domain, policy, "an aligned check failed temporarily")
    return DMARCResult("fail", domain, policy, "no aligned pass")
