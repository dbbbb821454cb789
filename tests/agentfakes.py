"""
Fake delivery agents and their surroundings for the scheduler, router and
contract tests: a directory that knows local domains, an agent that records
its calls, deliver functions that answer from a script, at once or never.
A helper module, not a test file; tests/test_delivery_contract.py holds
each fake to the contract the real agents meet ("fakes meet the real
contract").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet import defer, task
from twisted.internet.defer import Deferred

from mailhub.address import normalize_domain
from mailhub.envelope import Envelope, Outcome, Recipient, ReportFunction

__all__ = ["FakeDirectory", "FakeAgent", "Call", "FakeDeliver", "Scripted", "SlowAndFast"]


class FakeDirectory:
    def __init__(self, *domains: str) -> None:
        self.domains = {normalize_domain(d) for d in domains}

    def is_local(self, domain: str) -> bool:
        return normalize_domain(domain) in self.domains


@dataclass
class FakeAgent:
    auto: bool = True
    calls: list = field(default_factory=list)

    def deliver(self, envelope: Envelope, recipients: list[Recipient], message_path: str, report: ReportFunction) -> Deferred:
        d: Deferred = Deferred()
        self.calls.append(([r.address for r in recipients], message_path, d))
        if self.auto:
            d.callback([Outcome.delivered(r.address) for r in recipients])
        return d


@dataclass
class Call:
    envelope: Envelope
    recipients: list[str]
    deferred: Deferred
    at: float


@dataclass
class FakeDeliver:
    """deliver(): records each call; answers from C{script} at once, or leaves the Deferred to the test."""

    clock: task.Clock
    script: dict = field(default_factory=dict)  # address -> list of (code, status, text) to answer in turn
    auto: bool = True
    calls: list[Call] = field(default_factory=list)

    def __call__(self, envelope: Envelope, recipients: list[Recipient], report: ReportFunction) -> Deferred:
        d: Deferred = Deferred()
        self.calls.append(Call(envelope, [r.address for r in recipients], d, self.clock.seconds()))
        if self.auto:
            d.callback([self.answer(r.address) for r in recipients])
        return d

    def answer(self, address: str) -> Outcome:
        answers = self.script.get(address)
        code, status, text = answers.pop(0) if answers else (250, "2.0.0", "delivered")
        if code < 400:
            return Outcome.delivered(address, text)
        if code < 500:
            return Outcome.temporary(address, text, code, status)
        return Outcome.permanent(address, text, code, status, remote_mta="mx.example.net")

    def to(self, address: str) -> list[Call]:
        return [c for c in self.calls if address in c.recipients]


@dataclass
class Scripted:
    """deliver(): fixed outcomes by address (delivered locally unless given); DSNs are left queued."""

    clock: task.Clock
    outcomes: dict = field(default_factory=dict)
    calls: list = field(default_factory=list)

    def __call__(self, envelope: Envelope, recipients: list[Recipient], report: ReportFunction) -> Deferred:
        self.calls.append((envelope, [r.address for r in recipients]))
        if envelope.sender == "":
            return Deferred()  # keep notifications in the spool to read them
        return defer.succeed([self.outcomes.get(r.address) or Outcome.delivered(r.address, "delivered to maildir")
                              for r in recipients])


@dataclass
class SlowAndFast:
    """deliver(): never answers for slow.example (a dead or tarpitting host); answers at once otherwise."""

    clock: task.Clock
    slow: list = field(default_factory=list)  # (queue id, Deferred)
    fast: list = field(default_factory=list)

    def __call__(self, envelope: Envelope, recipients: list[Recipient], report: ReportFunction) -> Deferred:
        if any(r.address.endswith("@slow.example") for r in recipients):
            d: Deferred = Deferred()
            self.slow.append((envelope.queue_id, d, [r.address for r in recipients]))
            return d
        self.fast.append((envelope.queue_id, self.clock.seconds()))
        return defer.succeed([Outcome.delivered(r.address) for r in recipients])
