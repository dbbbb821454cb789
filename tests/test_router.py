"""
Router tests with a fake directory (is_local) and fake delivery agents.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from agentfakes import FakeAgent, FakeDirectory
from twisted.internet import defer
from twisted.internet.defer import Deferred

from mailhub.delivery.router import NO_RELAY_TEXT, Router
from mailhub.envelope import DELIVERED_OUTCOME, PERMANENT, TEMPORARY, Envelope, Outcome, Recipient, ReportFunction
from mailhub.queue.spool import Spool


@pytest.fixture
def spool(tmp_path) -> Spool:
    return Spool(str(tmp_path / "spool"), fsync=False)


ENV = Envelope(
    "0ABCDEFGHJK123456",
    "a@example.com",
    [Recipient("me@Local.Example"), Recipient("far@remote.example"), Recipient("you@local.example")],
    arrival=0.0,
)


def run(router: Router, recipients=None) -> list[Outcome]:
    results = []
    router(ENV, recipients or ENV.recipients, report=lambda outcomes: None).addCallback(results.append)
    assert results, "router result did not fire"
    return results[0]


def test_split_by_domain(spool):
    local, remote = FakeAgent(), FakeAgent()
    out = run(Router(spool, FakeDirectory("local.example"), local, remote))
    assert local.calls[0][:2] == (["me@Local.Example", "you@local.example"], spool.message_path(ENV.queue_id))
    assert remote.calls[0][0] == ["far@remote.example"]
    assert [o.recipient for o in out] == [r.address for r in ENV.recipients]
    assert all(o.kind == DELIVERED_OUTCOME for o in out)


def test_no_remote_agent_is_temporary(spool):
    local = FakeAgent()
    out = run(Router(spool, FakeDirectory("local.example"), local))
    far = out[1]
    assert (far.kind, far.code, far.status, far.text) == (TEMPORARY, 451, "4.4.0", NO_RELAY_TEXT)
    assert out[0].kind == DELIVERED_OUTCOME and out[2].kind == DELIVERED_OUTCOME


def test_agents_run_concurrently(spool):
    local, remote = FakeAgent(auto=False), FakeAgent(auto=False)
    results = []
    router = Router(spool, FakeDirectory("local.example"), local, remote)
    router(ENV, ENV.recipients, report=lambda outcomes: None).addCallback(results.append)
    assert len(local.calls) == 1 and len(remote.calls) == 1 and not results
    remote.calls[0][2].callback([Outcome.permanent("far@remote.example", "no such user", 550, "5.1.1")])
    assert not results
    local.calls[0][2].callback([Outcome.delivered("me@Local.Example"), Outcome.delivered("you@local.example")])
    [out] = results
    assert [o.kind for o in out] == [DELIVERED_OUTCOME, PERMANENT, DELIVERED_OUTCOME]


@pytest.mark.parametrize("how", ["raise", "errback"])
def test_agent_failure_only_affects_its_recipients(spool, how):
    class Broken:
        def deliver(self, envelope, recipients, message_path, report):
            if how == "raise":
                raise RuntimeError("boom")
            return defer.fail(RuntimeError("boom"))

    remote = FakeAgent()
    out = run(Router(spool, FakeDirectory("local.example"), Broken(), remote))
    assert [o.kind for o in out] == [TEMPORARY, DELIVERED_OUTCOME, TEMPORARY]
    assert out[0].code == 451 and out[0].status == "4.3.0" and "boom" in out[0].text


def test_missing_and_stray_outcomes(spool):
    class Sloppy:
        def deliver(self, envelope, recipients, message_path, report):
            return defer.succeed([Outcome.delivered("me@Local.Example"), Outcome.delivered("far@remote.example")])

    remote = FakeAgent(auto=False)
    results = []
    router = Router(spool, FakeDirectory("local.example"), Sloppy(), remote)
    router(ENV, ENV.recipients, report=lambda outcomes: None).addCallback(results.append)
    # the local agent's claim about the remote recipient is ignored
    remote.calls[0][2].callback([Outcome.temporary("far@remote.example", "busy")])
    [out] = results
    assert [o.kind for o in out] == [DELIVERED_OUTCOME, TEMPORARY, TEMPORARY]
    assert out[1].text == "busy"
    assert out[2].text == "delivery agent reported no outcome"


def test_bad_addresses(spool):
    local = FakeAgent()
    rcpts = [Recipient("nodomain"), Recipient("x@-bad-.example"), Recipient("ok@local.example")]
    out = run(Router(spool, FakeDirectory("local.example"), local, FakeAgent()), rcpts)
    assert [(o.kind, o.status) for o in out] == [(PERMANENT, "5.1.3"), (PERMANENT, "5.1.2"), (DELIVERED_OUTCOME, "2.0.0")]
    assert local.calls[0][0] == ["ok@local.example"]


def test_only_remote_recipients_without_agent(spool):
    local = FakeAgent()
    out = run(Router(spool, FakeDirectory("local.example"), local), [Recipient("far@remote.example")])
    assert [o.kind for o in out] == [TEMPORARY] and local.calls == []


def test_with_the_real_directory(spool, tmp_path):
    directory_module = pytest.importorskip("mailhub.delivery.directory")
    directory = directory_module.Directory(["local.example"], str(tmp_path / "mailboxes"))
    local, remote = FakeAgent(), FakeAgent()
    run(Router(spool, directory, local, remote))
    assert local.calls[0][0] == ["me@Local.Example", "you@local.example"]
    assert remote.calls[0][0] == ["far@remote.example"]


def test_remote_outcome_fields_survive_the_merge(spool):
    """The scheduler's success notices read remote_mta and dsn_passed off the merged outcomes."""
    local, remote = FakeAgent(), FakeAgent(auto=False)
    results = []
    router = Router(spool, FakeDirectory("local.example"), local, remote)
    router(ENV, ENV.recipients, report=lambda outcomes: None).addCallback(results.append)
    relayed = Outcome.delivered("far@remote.example", "host mx said: 250 ok", "mx[192.0.2.1]:25", dsn_passed=True)
    remote.calls[0][2].callback([relayed])
    [out] = results
    assert out[1] is relayed
    assert [(o.remote_mta, o.dsn_passed) for o in (out[0], out[2])] == [("", False), ("", False)]


# -- progress reports (report=) ---------------------------------------------------------


@dataclass
class ReportingAgent:
    """An agent whose deliver() takes report=, like the remote agent."""

    calls: list = field(default_factory=list)

    def deliver(self, envelope: Envelope, recipients: list[Recipient], message_path: str, report: ReportFunction) -> Deferred:
        d: Deferred = Deferred()
        self.calls.append(([r.address for r in recipients], report, d))
        return d


def test_local_batch_reported_when_the_local_agent_ends(spool):
    local, remote = FakeAgent(auto=False), FakeAgent(auto=False)
    reports: list[list[Outcome]] = []
    results = []
    Router(spool, FakeDirectory("local.example"), local, remote)(ENV, ENV.recipients, report=reports.append) \
        .addCallback(results.append)
    assert reports == []
    local.calls[0][2].callback([Outcome.delivered("me@Local.Example"), Outcome.delivered("you@local.example")])
    # recorded now, while the remote agent is still busy
    assert [[o.recipient for o in r] for r in reports] == [["me@Local.Example", "you@local.example"]]
    assert not results
    remote.calls[0][2].callback([Outcome.temporary("far@remote.example", "busy")])
    assert [[o.recipient for o in r] for r in reports][1:] == [["far@remote.example"]]
    [out] = results
    assert [o.kind for o in out] == [DELIVERED_OUTCOME, TEMPORARY, DELIVERED_OUTCOME]


def test_agent_reports_forwarded_at_once_filtered_and_never_twice(spool):
    local, remote = FakeAgent(auto=False), ReportingAgent()
    reports: list[list[Outcome]] = []
    results = []
    Router(spool, FakeDirectory("local.example"), local, remote)(ENV, ENV.recipients, report=reports.append) \
        .addCallback(results.append)
    [(rcpts, agent_report, d)] = remote.calls
    assert rcpts == ["far@remote.example"] and agent_report is not None
    relayed = Outcome.delivered("far@remote.example", "250 ok", "mx[192.0.2.1]:25")
    agent_report([relayed, Outcome.delivered("me@Local.Example")])  # the stray one is dropped
    assert reports == [[relayed]]
    agent_report([Outcome.temporary("far@remote.example", "again?")])
    assert reports == [[relayed]]  # a recipient is reported once
    # the agent then fails: its reported delivery stands, in the report and the merged list
    d.errback(RuntimeError("boom"))
    assert reports == [[relayed]]
    local.calls[0][2].callback([Outcome.delivered("me@Local.Example"), Outcome.delivered("you@local.example")])
    [out] = results
    assert out[1] is relayed
    assert len(reports) == 2 and [o.recipient for o in reports[1]] == ["me@Local.Example", "you@local.example"]


def test_agents_without_report_still_called_the_old_way(spool):
    """Three-argument agents (LocalDelivery, fakes) are not given report=."""
    local, remote = FakeAgent(), FakeAgent()
    reports: list[list[Outcome]] = []
    out = []
    Router(spool, FakeDirectory("local.example"), local, remote)(ENV, ENV.recipients, report=reports.append) \
        .addCallback(out.extend)
    assert len(out) == 3 and sorted(o.recipient for r in reports for o in r) == sorted(r.address for r in ENV.recipients)


def test_a_failing_report_does_not_fail_the_delivery(spool):
    local, remote = FakeAgent(), ReportingAgent()

    def report(outcomes):
        raise RuntimeError("scheduler bug")

    results = []
    Router(spool, FakeDirectory("local.example"), local, remote)(ENV, ENV.recipients, report=report) \
        .addCallback(results.append)
    remote.calls[0][1]([Outcome.delivered("far@remote.example")])
    remote.calls[0][2].callback([Outcome.delivered("far@remote.example")])
    [out] = results
    assert [o.kind for o in out] == [DELIVERED_OUTCOME] * 3
