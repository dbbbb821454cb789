"""
C{mailhub tls check DOMAIN} and C{mailhub tls report [--date DAY] DOMAIN}:
the outbound TLS policy mailhub would apply to a domain and why, and a
day's TLS report (RFC 8460) for it.

Owns: the commands' options, their output and exit statuses.  C{check}
runs the relay's own policy code (L{mailhub.relay.tlspolicy}, with the
lookups of L{mailhub.relay.dane} and L{mailhub.relay.mtasts} through the
configured resolvers) in a reactor of its own, and never writes the
daemon's MTA-STS cache.  Must not touch: the policies' rules, the daemon.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
from typing import Any, TextIO

from twisted.python import usage

from mailhub.cli import Command
from mailhub.config import Config

__all__ = ["TLSOptions", "run_tls"]

EX_NOTFOUND = 1
EX_USAGE = 64
EX_TEMPFAIL = 75
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class CheckOptions(Command):
    synopsis = "mailhub tls check DOMAIN"
    longdesc = (
        "Show the outbound TLS policy mailhub would apply to DOMAIN and why: the policy table's "
        "entry, the MTA-STS policy (live, else cached, with its age), whether the MX records are "
        "DNSSEC-secure, and for each MX host the TLS level, its TLSA records or why it is refused.  "
        "Exits 0, or 75 when the MX lookup failed."
    )
    optParameters = [["https-port", None, "443", "port of the MTA-STS policy host (tests)", int]]

    def parseArgs(self, domain: str) -> None:  # type: ignore[override]
        self["domain"] = domain


class ReportOptions(Command):
    synopsis = "mailhub tls report [--date YYYY-MM-DD] DOMAIN"
    longdesc = (
        "Print the TLS report (RFC 8460 JSON) of one day (UTC, default today) for DOMAIN from "
        "the counts the daemon keeps in relay.tls_state.  Exits 1 when none were kept."
    )
    optParameters = [["date", None, None, "the day, YYYY-MM-DD (UTC)"]]

    def parseArgs(self, domain: str) -> None:  # type: ignore[override]
        self["domain"] = domain

    def postOptions(self) -> None:
        if self["date"] is not None and not _DAY.match(self["date"]):
            raise usage.UsageError("--date must be YYYY-MM-DD")


class TLSOptions(Command):
    synopsis = "mailhub tls check DOMAIN | mailhub tls report [--date YYYY-MM-DD] DOMAIN"
    longdesc = "The outbound TLS policies (docs/relay.rst, TLS policies)."
    subCommands = [
        ["check", None, CheckOptions, "Show the TLS policy for a domain and why."],
        ["report", None, ReportOptions, "Print a day's TLS report for a domain."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("no tls command given (check, report)")


def _domain(raw: str, err: TextIO) -> str | None:
    from mailhub.address import AddressError, normalize_domain

    try:
        return normalize_domain(raw)
    except AddressError as e:
        err.write(f"mailhub: tls: bad domain {raw[:100]!r}: {e}\n")
        return None


def _state(config: Config) -> str:
    import os

    return config.relay.tls_state or os.path.join(config.spool.path, "tls")


def _age(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60}m"
    return f"{seconds}s"


async def _check(reactor: Any, config: Config, domain: str, https_port: int, out: TextIO) -> int:
    import time

    from mailhub.daemon.components import remote_delivery, tls_policies
    from mailhub.relay.mx import HopFailure

    agent = remote_delivery(config, reactor)
    tls_policies(config, reactor, agent, https_port=https_port)
    policy = agent.tls_policy
    if policy.mtasts is not None:
        policy.mtasts.persist = False
    dest = agent.route(domain)
    out.write(f"domain: {domain}\nnext hop: {dest}{' (MX lookup)' if dest.mx else ''}\n")
    out.write(f"default: relay.tls = {policy.default}\n")
    dp = await policy.for_destination(dest)
    out.write(f"table: {dp.table if dp.table is not None else 'no entry'}\n")
    if policy.dane is None:
        out.write("dane: off (relay.dane = false)\n")
    else:
        trusted = policy.dane.trusted
        out.write(f"dane: resolver {'local, AD bit believed' if trusted else 'not local: AD bit ignored'}; "
                  f"MX records {'DNSSEC-secure' if dp.mx_secure else 'not validated'}\n")
    if policy.mtasts is None:
        out.write("mta-sts: off (relay.mta_sts = false)\n")
    else:
        cached = policy.mtasts.cached(dest.host)
        if dp.sts is not None:
            p = dp.sts.policy
            now = time.time()
            out.write(f"mta-sts: mode={p.mode} id={dp.sts.id} max_age={p.max_age} mx={','.join(p.mx)} "
                      f"(fetched {_age(now - dp.sts.fetched)} ago, expires in {_age(dp.sts.expires - now)})\n")
        elif cached is not None:
            out.write(f"mta-sts: cached policy expired (mode={cached.policy.mode})\n")
        else:
            out.write("mta-sts: no policy\n")
    out.write(f"policy: {dp.source}\n")
    try:
        targets = await agent.targets(dest)
    except HopFailure as e:
        out.write(f"mx: {e.text}\n")
        return EX_TEMPFAIL if e.kind != "permanent" else 0
    seen = set()
    for t in targets:
        if (t.name, t.port) in seen:
            continue
        seen.add((t.name, t.port))
        hp = await policy.for_host(dp, t.name, t.port)
        line = f"mx {t.name} port {t.port}: tls={hp.tls} source={hp.source}"
        if hp.observe:
            line += " (testing: verified and reported, not enforced)"
        if hp.refuse:
            line += f" REFUSED: {hp.refuse}"
        if hp.warning:
            line += f" (would be refused: {hp.warning})"
        out.write(line + "\n")
        for rec in hp.tlsa:
            out.write(f"  tlsa {rec}\n")
    return 0


def run_check(options: CheckOptions, config: Config, out: TextIO, err: TextIO) -> int:
    from twisted.internet import defer
    from twisted.internet import reactor as _reactor

    domain = _domain(options["domain"], err)
    if domain is None:
        return EX_USAGE
    reactor: Any = _reactor
    result: list[int] = []

    def start() -> None:
        d = defer.ensureDeferred(_check(reactor, config, domain, options["https-port"], out))

        def done(value: Any) -> None:
            if isinstance(value, int):
                result.append(value)
            else:
                err.write(f"mailhub: tls check: {value.getErrorMessage()}\n")
                result.append(EX_TEMPFAIL)
            reactor.stop()

        d.addBoth(done)

    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=False)
    return result[0] if result else EX_TEMPFAIL


def run_report(options: ReportOptions, config: Config, out: TextIO, err: TextIO) -> int:
    import uuid

    from mailhub.relay.tlsrpt import build_report, load_day

    domain = _domain(options["domain"], err)
    if domain is None:
        return EX_USAGE
    day = options["date"] or datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    try:
        counts = load_day(_state(config), day)
    except (OSError, ValueError) as e:
        err.write(f"mailhub: tls report: cannot read the counts of {day}: {e}\n")
        return EX_TEMPFAIL
    if domain not in counts:
        err.write(f"mailhub: tls report: no TLS sessions with {domain} recorded on {day}\n")
        return EX_NOTFOUND
    report = build_report(domain, day, counts[domain], config.server.hostname,
                          f"postmaster@{config.local.domains[0]}", str(uuid.uuid4()))
    out.write(json.dumps(report, indent=2) + "\n")
    return 0


def run_tls(options: TLSOptions, config: Config, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    if options.subCommand == "check":
        return run_check(options.subOptions, config, out, err)
    return run_report(options.subOptions, config, out, err)
