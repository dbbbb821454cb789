"""
SMTP TLS reporting (RFC 8460): what the relay saw, per recipient domain and
policy, and the daily aggregate report.

Owns: the per-day counts of successful and failed TLS sessions per policy
domain and policy (L{TLSReports.record}), their file under the TLS state
directory (C{tlsrpt/YYYY-MM-DD.json}, written by a timer and when the
service stops, never per session), the RFC 8460 JSON of one domain's day
(L{build_report}), the C{_smtp._tls} TXT record (L{parse_rua}), the report
message (L{report_message}: C{multipart/report; report-type="tlsrpt"}
with the gzipped JSON), the HTTPS upload (L{https_poster}) and, when
C{relay.tls_reports} is on, sending the previous days' reports to the
C{mailto:} and C{https:} addresses once each.

Also what the relay agent tells the mail log and the metrics about TLS:
the C{relay_tls} mail events (L{tls_failure}, L{tls_delivered}: the
C{tls=... cipher=... verified=...} words of a delivery) and the counts
(L{record_session}).

Must not touch: the policies themselves (L{mailhub.relay.tlspolicy}),
connections, the spool (a report is handed to the C{submit} callable, which
the daemon points at the pickup area).
"""

from __future__ import annotations

import datetime
import gzip
import io
import json
import os
import re
import uuid
from collections.abc import Awaitable, Callable
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers

from mailhub.maillog import mail_event
from mailhub.relay.tlspolicy import DomainPolicy, HostPolicy, verified

__all__ = [
    "record_session", "session_info", "tls_delivered", "tls_failure",
    "TLSReports", "build_report", "parse_rua", "report_message", "report_gzip", "https_poster", "result_type",
    "day_of", "load_day",
]

log = Logger()

#: Failure detail rows kept per policy and day (bounded whatever remote servers do).
MAX_DETAILS = 100
#: Report addresses used from one TXT record.
MAX_RUA = 5


def day_of(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d")


def result_type(text: str) -> str:
    """The RFC 8460 result type of a TLS failure, from its text (mailhub.relay.tls words)."""
    t = text.lower()
    if "does not match its tlsa" in t:
        return "tlsa-invalid"
    if "tlsa lookup" in t:
        return "dnssec-invalid"
    if "no usable dnssec-validated tlsa" in t:
        return "dane-required"
    if "does not match its name" in t or "names no host" in t:
        return "certificate-host-mismatch"
    if "has expired" in t or "not yet valid" in t:
        return "certificate-expired"
    if "not trusted" in t:
        return "certificate-not-trusted"
    if "not offered" in t or "refused to start tls" in t:
        return "starttls-not-supported"
    if "mta-sts policy" in t:
        return "validation-failure"
    return "validation-failure"


def parse_rua(strings: list[list[bytes]]) -> list[str]:
    """The C{rua} URIs of the one C{v=TLSRPTv1} TXT record (RFC 8460 3); [] when there is not exactly one."""
    found = [b"".join(p).decode("ascii", "replace") for p in strings]
    found = [t for t in found if re.match(r"v=TLSRPTv1\s*;", t)]
    if len(found) != 1:
        return []
    for item in found[0].split(";"):
        k, eq, v = item.strip().partition("=")
        if eq and k.strip() == "rua":
            return [u.strip() for u in v.split(",") if u.strip()][:MAX_RUA]
    return []


def _policy_key(policy_type: str, strings: list[str], mx: list[str]) -> str:
    return json.dumps([policy_type, strings, mx])


def build_report(domain: str, day: str, policies: dict[str, Any], organization: str, contact: str,
                 report_id: str) -> dict[str, Any]:
    """One domain's day in RFC 8460's JSON (section 4.4)."""
    out = []
    for key, entry in sorted(policies.items()):
        ptype, strings, mx = json.loads(key)
        policy: dict[str, Any] = {"policy-type": ptype, "policy-domain": domain}
        if strings:
            policy["policy-string"] = strings
        if mx:
            policy["mx-host"] = mx
        item: dict[str, Any] = {
            "policy": policy,
            "summary": {"total-successful-session-count": entry["success"],
                        "total-failure-session-count": entry["failure"]},
        }
        details = []
        for dkey, count in sorted(entry["details"].items()):
            rtype, mx_host, ip, sending = json.loads(dkey)
            row = {"result-type": rtype, "receiving-mx-hostname": mx_host, "failed-session-count": count}
            if ip:
                row["receiving-ip"] = ip
            if sending:
                row["sending-mta-ip"] = sending
            details.append(row)
        if details:
            item["failure-details"] = details
        out.append(item)
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": f"{day}T00:00:00Z", "end-datetime": f"{day}T23:59:59Z"},
        "contact-info": contact,
        "report-id": report_id,
        "policies": out,
    }


def report_gzip(report: dict[str, Any]) -> bytes:
    """The report as RFC 8460 sends it: JSON, gzipped."""
    return gzip.compress(json.dumps(report, indent=1).encode("utf-8"))


def https_poster(agent: Any, reactor: Any, timeout: float = 60.0) -> Callable[[str, bytes], Any]:
    """
    C{post(uri, gzipped_report)} through twisted.web's C{agent} (RFC 8460
    5.4: C{application/tlsrpt+gzip}); a 2xx is success, anything else raises.
    """

    def post(uri: str, body: bytes) -> Any:
        async def go() -> None:
            response = await agent.request(
                b"POST", uri.encode("ascii"), Headers({b"content-type": [b"application/tlsrpt+gzip"]}),
                FileBodyProducer(io.BytesIO(body)),
            )
            response.deliverBody(Protocol())  # the answer's body is not read
            if not 200 <= response.code < 300:
                raise OSError(f"HTTP status {response.code}")

        return defer.ensureDeferred(go()).addTimeout(timeout, reactor)

    return post


def report_message(report: dict[str, Any], domain: str, organization: str, sender: str, to: str) -> bytes:
    """The report mail (RFC 8460 5.3): multipart/report, report-type tlsrpt, the JSON gzipped."""
    day = report["date-range"]["start-datetime"][:10]
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
    msg["Subject"] = f"Report Domain: {domain} Submitter: {organization} Report-ID: <{report['report-id']}>"
    msg["TLS-Report-Domain"] = domain
    msg["TLS-Report-Submitter"] = organization
    msg.set_content(f"TLS report for {domain}, {day}, from {organization}.\n")
    name = f"{organization}!{domain}!{day}T00:00:00Z!{day}T23:59:59Z!{report['report-id'][:8]}.json.gz"
    msg.add_attachment(
        report_gzip(report), maintype="application",
        subtype="tlsrpt+gzip", filename=name,
    )
    msg.replace_header("Content-Type", 'multipart/report; report-type="tlsrpt"; boundary="%s"' % msg.get_boundary())
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def load_day(state_dir: str, day: str) -> dict[str, dict[str, Any]]:
    """The counts of one day: domain -> policy key -> entry; {} when none were kept."""
    path = os.path.join(state_dir, "tlsrpt", day + ".json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    return data if isinstance(data, dict) else {}


# -- what the relay agent reports -------------------------------------------------------


def session_info(conn: Any) -> dict[str, Any]:
    """C{conn.tls_info} (L{mailhub.relay.client.SMTPConnection}), or what a connection without it says."""
    info = getattr(conn, "tls_info", None)
    if isinstance(info, dict):
        return info
    tls = bool(getattr(conn, "tls", False))
    return {"version": "TLS" if tls else "", "cipher": "", "pkix_error": "not checked", "dane": None}


def _policy_word(hp: HostPolicy | None) -> str:
    return "none" if hp is None else ("table" if hp.source == "table" else hp.report_type)


def record_session(reports: TLSReports | None, dp: DomainPolicy, hp: HostPolicy, host: str, ip: str,
                   problem: str | None, rtype: str = "") -> None:
    """Count one session with MX C{host} (or one refusal) for the TLS reports: failed when C{problem}."""
    if reports is None:
        return
    if hp.report_type == "tlsa":
        strings = [str(r) for r in hp.tlsa]
        mx: list[str] = []
    elif hp.report_type == "sts" and dp.sts is not None:
        p = dp.sts.policy
        strings = ["version: STSv1", f"mode: {p.mode}"] + [f"mx: {m}" for m in p.mx] + [f"max_age: {p.max_age}"]
        mx = list(p.mx)
    else:
        strings, mx = [], []
    reports.record(dp.domain, hp.report_type, strings, mx, problem is None,
                   rtype or (result_type(problem) if problem else ""), host, ip)


def tls_failure(reports: TLSReports | None, queue_id: str, dp: DomainPolicy, hp: HostPolicy, host: str, ip: str,
                where: str, result: str, reason: str = "", rtype: str = "") -> None:
    """
    A TLS failure or a refused host (C{result="failed"}), or what MTA-STS
    testing would have refused (C{"testing-failed"}): logged, counted, reported.
    """
    mail_event(
        "relay_tls", "{queue_id}: TLS {result} for {domain} at {relay}: policy={policy} ({reason})",
        queue_id=queue_id, result=result, domain=dp.domain, relay=where, policy=_policy_word(hp), reason=reason,
        verified="none", count=1,
    )
    record_session(reports, dp, hp, host, ip, reason or result, rtype)


def tls_delivered(queue_id: str, dp: DomainPolicy | None, hp: HostPolicy | None, remote_mta: str,
                  info: dict[str, Any], count: int) -> str:
    """
    One C{relay_tls} event for C{count} recipients delivered in a session;
    returns the words their outcomes end with (C{" tls=TLSv1.3 cipher=...
    verified=dane"}).
    """
    word = verified(hp, info)
    note = f" tls={info['version'] or 'none'} cipher={info['cipher'] or 'none'} verified={word}"
    mail_event(
        "relay_tls", "{queue_id}: TLS delivered {count} to {relay}: policy={policy}{note}",
        queue_id=queue_id, result="delivered", count=count, relay=remote_mta,
        domain=dp.domain if dp is not None else "", policy=_policy_word(hp), verified=word, note=note,
    )
    return note


class TLSReports(service.Service):
    """
    The counts of the TLS sessions, per day, domain and policy; with
    C{send}, the daily reports to the domains that ask for them.

    @param txt: C{txt(name)} -> TXT records (lists of strings).
    @param submit: C{submit(sender, recipient, message_bytes)} -> Deferred; queues a report mail.
    @param post: C{post(https_uri, gzipped_json)} -> Deferred (L{https_poster}).
    """

    def __init__(self, reactor: Any, state_dir: str, *, organization: str, sender: str,
                 txt: Callable[[str], Awaitable[list[list[bytes]]]] | None = None,
                 submit: Callable[[str, str, bytes], Any] | None = None, send: bool = False,
                 post: Callable[[str, bytes], Any] | None = None,
                 flush_interval: float = 60.0, send_interval: float = 3600.0) -> None:
        self._reactor = reactor
        self._dir = os.path.join(state_dir, "tlsrpt")
        self.organization, self.sender = organization, sender
        self._txt, self._submit, self._send, self._post = txt, submit, send, post
        self._days: dict[str, dict[str, dict[str, Any]]] = {}
        self._dirty: set[str] = set()
        self._flush = task.LoopingCall(self.flush)
        self._flush.clock = reactor
        self._sender = task.LoopingCall(self.send_due)
        self._sender.clock = reactor
        self._intervals = (flush_interval, send_interval)

    def record(self, domain: str, policy_type: str, strings: list[str], mx: list[str], ok: bool,
               rtype: str = "", mx_host: str = "", ip: str = "") -> None:
        """One session (or one host refused) for C{domain} under a policy."""
        day = day_of(self._reactor.seconds())
        if day not in self._days:
            self._days[day] = load_day(os.path.dirname(self._dir), day)
        entry = self._days[day].setdefault(domain, {}).setdefault(
            _policy_key(policy_type, strings, mx), {"success": 0, "failure": 0, "details": {}})
        if ok:
            entry["success"] += 1
        else:
            entry["failure"] += 1
            dkey = json.dumps([rtype or "validation-failure", mx_host, ip, ""])
            if dkey in entry["details"] or len(entry["details"]) < MAX_DETAILS:
                entry["details"][dkey] = entry["details"].get(dkey, 0) + 1
        self._dirty.add(day)

    def flush(self) -> None:
        """Write the days that changed (small JSON files, replaced by a rename)."""
        for day in sorted(self._dirty):
            try:
                os.makedirs(self._dir, mode=0o750, exist_ok=True)
                tmp = os.path.join(self._dir, day + ".json.tmp")
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(self._days[day], f)
                os.replace(tmp, os.path.join(self._dir, day + ".json"))
            except OSError as e:
                log.warn("cannot write TLS report counts: {error}", error=str(e))
                continue
            self._dirty.discard(day)
        today = day_of(self._reactor.seconds())
        for day in [d for d in self._days if d < today and d not in self._dirty]:
            del self._days[day]

    async def _send_day(self, day: str) -> None:
        assert self._txt is not None and self._submit is not None
        for domain, policies in sorted(load_day(os.path.dirname(self._dir), day).items()):
            try:
                rua = parse_rua(await self._txt(f"_smtp._tls.{domain}"))
            except Exception as e:
                log.info("no TLS-RPT record for {domain}: {error}", domain=domain, error=str(e) or type(e).__name__)
                continue
            report = build_report(domain, day, policies, self.organization, self.sender, str(uuid.uuid4()))
            for uri in rua:
                if uri.lower().startswith("https://") and self._post is not None:
                    try:
                        await self._post(uri, report_gzip(report))
                    except Exception as e:
                        log.info("TLS report for {domain} to {uri} failed: {error}", domain=domain, uri=uri[:100],
                                 error=str(e) or type(e).__name__)
                    else:
                        log.info("TLS report for {domain} ({day}) posted to {uri}", domain=domain, day=day,
                                 uri=uri[:100])
                    continue
                if not uri.lower().startswith("mailto:"):
                    log.info("TLS report for {domain}: {uri} is neither mailto: nor https:; skipped", domain=domain,
                             uri=uri[:100])
                    continue
                to = uri[7:].split("?", 1)[0]
                if not re.fullmatch(r"[^@\s<>]+@[A-Za-z0-9.-]+", to):
                    continue
                await self._submit(self.sender, to, report_message(report, domain, self.organization, self.sender, to))
                log.info("TLS report for {domain} ({day}) queued to {to}", domain=domain, day=day, to=to)

    def send_due(self) -> Any:
        """Send each finished day's reports once (a C{.sent} marker file records it)."""
        if not self._send or self._txt is None or self._submit is None:
            return None
        self.flush()
        if not os.path.isdir(self._dir):
            return None
        today = day_of(self._reactor.seconds())

        async def go() -> None:
            for name in sorted(os.listdir(self._dir)):
                day = name[:-5]
                if not name.endswith(".json") or day >= today or os.path.exists(os.path.join(self._dir, day + ".sent")):
                    continue
                with open(os.path.join(self._dir, day + ".sent"), "w"):
                    pass
                await self._send_day(day)

        return defer.ensureDeferred(go()).addErrback(lambda f: log.failure("sending TLS reports failed", f))

    def startService(self) -> None:
        super().startService()
        self._flush.start(self._intervals[0], now=False)
        if self._send:
            self._sender.start(self._intervals[1], now=False)

    def stopService(self) -> Any:
        super().stopService()
        for loop in (self._flush, self._sender):
            if loop.running:
                loop.stop()
        self.flush()
