"""
The inbound authentication check: SPF, DKIM and DMARC at the end of DATA,
and our Authentication-Results field.

Owns: L{AuthCheck}, the L{mailhub.smtp.checks.MessageCheck} that, for a
message from a client that is not us (not authenticated, not in the
trusted networks), runs SPF of the MAIL FROM (HELO for the null sender),
DKIM of every signature and DMARC (L{evaluate}, in a worker thread, its
DNS through L{mailhub.auth.dns.AuthDNS}); removes every
Authentication-Results field carrying our authserv-id, from every client
(RFC 8601 5: nobody forges our verdict); prepends ours; puts C{spf=},
C{dkim=}, C{dmarc=} in the mail log's "accepted" line (the metrics count
them from there); and applies the policy: with C{dmarc_enforce}, a DMARC
failure under C{p=reject} is C{550 5.7.1} and under C{p=quarantine} gets an
C{X-Mailhub-Quarantine} field and a C{quarantine=dmarc} log field; a
C{spf_reject}, an SPF C{fail} is C{550 5.7.23}; a
temporary DNS error is C{451 4.7.0} or accepted with C{temperror} in the
header, as C{temperror} says -- never a permanent refusal.  For a client
that is us it only marks the envelope (C{client["relay_allowed"]}) so the
signer knows the message is ours.

Must not touch: the spool (only through the staged message), the session.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer

from mailhub.auth.dkimcheck import DKIMResult, verify_dkim
from mailhub.auth.dmarc import DMARCResult, check_dmarc
from mailhub.auth.dns import AuthDNS
from mailhub.auth.results import results_field, strip_ours
from mailhub.auth.spfcheck import SPFResult, check_spf
from mailhub.relay.downgrade import split_header
from mailhub.smtp.checks import HEADER_LIMIT, StagedMessage
from mailhub.smtp.proto import Reply

__all__ = ["AuthCheck", "AuthSettings", "Verdict", "evaluate", "DEFER", "ACCEPT", "TEMP_REPLY"]

DEFER, ACCEPT = "defer", "accept"
SPF_REPLY = Reply(550, "5.7.23", "SPF validation failed: the sender's domain does not allow this host")
TEMP_REPLY = Reply(451, "4.7.0", "Temporary DNS error checking the sender's authentication, try again later")


def _plain(domain: str) -> str:
    """A domain from the message, safe in a reply or a header: letters, digits, dots and hyphens, at most 100."""
    return "".join(c for c in domain if c.isascii() and (c.isalnum() or c in ".-"))[:100] or "-"


@dataclass(frozen=True)
class AuthSettings:
    """
    @ivar authserv_id: our name in Authentication-Results (server.hostname by default).
    @ivar verify: check inbound mail (off: only the trusted mark for signing).
    @ivar dmarc_enforce: apply p=reject / p=quarantine.
    @ivar temperror: L{DEFER} (451) or L{ACCEPT} (mark and accept).
    @ivar spf_reject: an SPF C{fail} (the domain's C{-all}) is C{550 5.7.23}.
    """

    authserv_id: str
    verify: bool = True
    dmarc_enforce: bool = False
    temperror: str = ACCEPT
    spf_reject: bool = False


@dataclass(frozen=True)
class Verdict:
    spf: SPFResult
    dkim: list[DKIMResult]
    dmarc: DMARCResult

    @property
    def dkim_summary(self) -> str:
        """One word for the log: pass if any signature passed, else the first result."""
        if any(r.result == "pass" for r in self.dkim):
            return "pass"
        return self.dkim[0].result if self.dkim else "none"


def evaluate(dns: AuthDNS, raw: bytes, ip: str, sender: str, helo: str) -> Verdict:
    """SPF, DKIM and DMARC of one message (in a worker thread; DNS through C{dns.blocking})."""

    def txt(name: str) -> list[bytes]:
        return [b"".join(v) for _o, kind, v in dns.blocking(name, "TXT") if kind == "TXT"]

    spf = check_spf(dns.blocking, ip, sender, helo)
    dkim = verify_dkim(raw, txt)
    head, _sep, _body, _complete = split_header(raw[:HEADER_LIMIT])
    dmarc = check_dmarc(txt, head, spf, dkim)
    return Verdict(spf, dkim, dmarc)


class AuthCheck:
    """
    The end-of-data check.

    @param run: runs a function in the auth thread pool (a Deferred of its result).
    """

    name = "auth"

    def __init__(self, settings: AuthSettings, dns: AuthDNS | None, run: Callable[..., defer.Deferred[Any]]) -> None:
        self.settings = settings
        self.dns = dns
        self.run = run

    def check(self, message: StagedMessage) -> defer.Deferred[Reply | None] | None:
        if message.trusted:
            message.envelope.client["relay_allowed"] = True
        if not self.settings.verify:
            return None
        return defer.Deferred.fromCoroutine(self._check(message))

    async def _check(self, message: StagedMessage) -> Reply | None:
        header = message.header_section()
        clean, removed = strip_ours(header, self.settings.authserv_id)
        if removed:
            message.replace_start(len(header), clean)
            message.log_fields["ar_removed"] = str(removed)
        if message.trusted or self.dns is None:
            return None
        client = message.client
        raw: bytes = await self.run(lambda: b"".join(message.content()))
        verdict: Verdict = await self.run(
            evaluate, self.dns, raw, str(client.get("addr") or ""), message.envelope.sender, str(client.get("helo") or "")
        )
        return self.apply(message, verdict)

    def apply(self, message: StagedMessage, verdict: Verdict) -> Reply | None:
        """The policy: a refusal, or the header and log fields of an accepted message."""
        s, dmarc = self.settings, verdict.dmarc
        if s.temperror == DEFER and "temperror" in (verdict.spf.result, dmarc.result):
            return TEMP_REPLY
        if s.spf_reject and verdict.spf.result == "fail":
            return SPF_REPLY
        if s.dmarc_enforce and dmarc.result == "fail" and dmarc.policy == "reject":
            return Reply(550, "5.7.1", f"Message rejected by the DMARC policy of {_plain(dmarc.from_domain)}")
        fields = results_field(s.authserv_id, verdict.spf, verdict.dkim, dmarc)
        message.log_fields.update(spf=verdict.spf.result, dkim=verdict.dkim_summary, dmarc=dmarc.result)
        if s.dmarc_enforce and dmarc.result == "fail" and dmarc.policy == "quarantine":
            fields = f"X-Mailhub-Quarantine: DMARC policy quarantine of {_plain(dmarc.from_domain)}\r\n".encode() + fields
            message.log_fields["quarantine"] = "dmarc"
        message.prepend(fields)
        return None
