"""
The delivery agent contract (L{mailhub.envelope.DeliveryAgent} and
L{mailhub.envelope.DeliverFunction}), checked the same way for the real
agents and for the fakes the other tests use: C{deliver} takes the
envelope, the recipients, the message path (agents only) and C{report},
always passed; it fires with one outcome per recipient given; each report
is a subset of the recipients, and no recipient is reported twice.
"""

from __future__ import annotations

import inspect

import pytest
from agentfakes import FakeAgent, FakeDeliver, FakeDirectory, Scripted, SlowAndFast
from twisted.internet import defer, task

from mailhub.delivery.directory import Directory
from mailhub.delivery.local import LocalDelivery
from mailhub.delivery.localproc import LocalDeliveryProcesses
from mailhub.delivery.router import Router
from mailhub.delivery.supervisor import PrivilegedDelivery
from mailhub.envelope import DeliverFunction, DeliveryAgent, Envelope, Recipient
from mailhub.queue.queuefile import queue_file_bytes
from mailhub.queue.spool import Spool
from mailhub.relay.agent import RemoteDelivery

AGENT_PARAMS = ["envelope", "recipients", "message_path", "report"]
DELIVER_PARAMS = ["envelope", "recipients", "report"]


def required(function) -> list[str]:
    """The parameters C{function} requires (none may be optional: report is always passed)."""
    params = list(inspect.signature(function).parameters.values())
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params), params
    assert all(p.default is p.empty for p in params), f"{function}: an optional parameter"
    return [p.name for p in params]


def test_the_protocols_name_the_contract():
    assert required(DeliveryAgent.deliver)[1:] == AGENT_PARAMS
    assert required(DeliverFunction.__call__)[1:] == DELIVER_PARAMS


@pytest.mark.parametrize("agent", [LocalDelivery, LocalDeliveryProcesses, PrivilegedDelivery, RemoteDelivery, FakeAgent])
def test_agents_take_the_contract_signature(agent):
    assert required(agent.deliver)[1:] == AGENT_PARAMS


@pytest.mark.parametrize("deliver", [Router.__call__, FakeDeliver.__call__, Scripted.__call__, SlowAndFast.__call__])
def test_deliver_functions_take_the_contract_signature(deliver):
    assert required(deliver)[1:] == DELIVER_PARAMS


def check_round(d: defer.Deferred, recipients: list[Recipient], reports: list[list]) -> None:
    """One outcome per recipient given, reports are subsets, none repeated."""
    results: list = []
    d.addCallback(results.append)
    assert results, "deliver did not fire"
    assert sorted(o.recipient for o in results[0]) == sorted(r.address for r in recipients)
    given = {r.address for r in recipients}
    seen: set[str] = set()
    for batch in reports:
        names = [o.recipient for o in batch]
        assert set(names) <= given and not seen & set(names) and len(set(names)) == len(names)
        seen.update(names)


ENV = Envelope(
    "0ABCDEFGHJK123456",
    "a@example.com",
    [Recipient("alice@example.org"), Recipient("nobody@example.org"), Recipient("far@remote.example")],
    arrival=1.0,
)


def test_local_agent_meets_the_contract(tmp_path):
    (tmp_path / "mailboxes" / "example.org" / "alice").mkdir(parents=True)
    agent = LocalDelivery(Directory(["example.org"], str(tmp_path / "mailboxes"), users=["alice"]), "mx.example.org",
                          run=lambda f, *a, **kw: defer.maybeDeferred(f, *a, **kw), fsync=False)
    path = tmp_path / "queued"
    path.write_bytes(queue_file_bytes(b"Subject: x\r\n\r\nbody\r\n", ENV))
    reports: list = []
    local = ENV.recipients[:2]
    check_round(agent.deliver(ENV, local, str(path), reports.append), local, reports)


def test_router_over_fake_agents_meets_the_contract(tmp_path):
    spool = Spool(str(tmp_path / "spool"), fsync=False)
    router = Router(spool, FakeDirectory("example.org"), FakeAgent(), FakeAgent())
    reports: list = []
    check_round(router(ENV, ENV.recipients, reports.append), ENV.recipients, reports)
    assert reports, "the router passes each agent's outcomes on"


@pytest.mark.parametrize("fake", [FakeDeliver, Scripted])
def test_scheduler_fakes_meet_the_contract(fake):
    reports: list = []
    check_round(fake(task.Clock())(ENV, ENV.recipients, reports.append), ENV.recipients, reports)
