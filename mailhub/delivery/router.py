"""
Routing: which delivery agent gets which recipient of a message.

Owns: the split of one delivery round's recipients by transport (local
domains to the local agent, everything else to the remote agent) and the
merge of the agents' outcomes into one list with exactly one outcome per
recipient given; passing outcomes on to the scheduler's C{report}
callback as soon as they are known -- each agent's batch when that agent
finishes (the local agent answers per call), and each report an agent
makes through the C{report} it is always given (the remote agent: one per
next-hop transaction) at once -- so one slow destination does
not hold back the recording of the others.  The first outcome known for a
recipient is the one passed on and the one in the merged list.

Must not touch: retry decisions (the scheduler's), the spool's files (only
asks it for the message path), mailboxes or the network (the agents').
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailhub.address import AddressError
from mailhub.envelope import DeliveryAgent, Envelope, Outcome, Recipient, ReportFunction

if TYPE_CHECKING:  # pragma: no cover
    from mailhub.queue.spool import Spool

__all__ = ["Router", "NO_RELAY_TEXT"]

log = Logger()

NO_RELAY_TEXT = "no route to non-local domain: relay not configured"


class _LocalDomains(Protocol):
    def is_local(self, domain: str) -> bool:
        ...


class Router:
    """
    The C{deliver} callable given to the scheduler.

    Both agents run concurrently for one message; a failure (exception) of
    one agent turns into temporary outcomes for its recipients only, so the
    other agent's deliveries are still recorded and never repeated.
    """

    def __init__(
        self,
        spool: Spool,
        directory: _LocalDomains,
        local: DeliveryAgent,
        remote: DeliveryAgent | None = None,
    ) -> None:
        self.spool = spool
        self.directory = directory
        self.local = local
        self.remote = remote

    def split(self, recipients: list[Recipient]) -> tuple[list[Recipient], list[Recipient], list[Outcome]]:
        """
        (local recipients, remote recipients, outcomes decided here) -- the
        last for addresses whose domain cannot even be classified.
        """
        local: list[Recipient] = []
        remote: list[Recipient] = []
        decided: list[Outcome] = []
        for r in recipients:
            at = r.address.rfind("@")
            if at <= 0:
                decided.append(Outcome.permanent(r.address, "bad recipient address syntax", 550, "5.1.3"))
                continue
            try:
                is_local = self.directory.is_local(r.address[at + 1 :])
            except AddressError as e:
                decided.append(Outcome.permanent(r.address, f"bad recipient domain: {e}", 550, e.enhanced))
                continue
            (local if is_local else remote).append(r)
        return local, remote, decided

    def __call__(
        self, envelope: Envelope, recipients: list[Recipient], report: ReportFunction
    ) -> Deferred[list[Outcome]]:
        """
        Deliver through both agents at once; fires with one outcome per
        recipient.  C{report} is called with outcomes as they
        become known (each at most once per recipient), before this fires.
        """
        local, remote, decided = self.split(recipients)
        path = self.spool.message_path(envelope.queue_id)
        known: dict[str, Outcome] = {}  # the first outcome per recipient
        rounds: list[Deferred] = []
        if local:
            rounds.append(self._run(self.local, "local", envelope, local, path, known, report))
        if remote:
            if self.remote is None:
                # Trusted clients may relay, but no remote agent exists yet:
                # keep the mail queued (and expire it by the usual rules).
                decided += [Outcome.temporary(r.address, NO_RELAY_TEXT, 451, "4.4.0") for r in remote]
            else:
                rounds.append(
                    self._run(self.remote, "remote", envelope, remote, path, known, report)
                )
        d = defer.gatherResults(rounds, consumeErrors=True)
        d.addCallback(self._merge, recipients, decided, envelope.queue_id, known)
        return d

    def _run(
        self,
        agent: DeliveryAgent,
        name: str,
        envelope: Envelope,
        recipients: list[Recipient],
        path: str,
        known: dict[str, Outcome],
        report: ReportFunction,
    ) -> Deferred:
        """
        One agent's round; its outcomes filtered to its own recipients, its
        errors made temporary, each new outcome recorded in C{known} and
        passed to C{report} -- from the agent's own reports as they come,
        and the rest of its list when it finishes.
        """
        mine = {r.address for r in recipients}

        def failed(f: Failure) -> list[Outcome]:
            log.failure(
                "{queue_id}: {agent} delivery agent failed", f, queue_id=envelope.queue_id, agent=name
            )
            text = f"{name} delivery agent error: {f.getErrorMessage()}"
            return [Outcome.temporary(r.address, text, 451, "4.3.0") for r in recipients]

        def mine_only(outcomes: list[Outcome]) -> list[Outcome]:
            kept = []
            for o in outcomes:
                if o.recipient in mine:
                    kept.append(o)
                else:
                    log.warn(
                        "{queue_id}: {agent} agent reported on a recipient it was not given: {rcpt}",
                        queue_id=envelope.queue_id, agent=name, rcpt=o.recipient,
                    )
            return kept

        def forward(outcomes: list[Outcome]) -> None:
            new = []
            for o in mine_only(outcomes):
                if o.recipient not in known:
                    known[o.recipient] = o
                    new.append(o)
            if new:
                try:
                    report(new)
                except Exception:  # the caller's bug must not fail the agent's delivery
                    log.failure("{queue_id}: error reporting outcomes", queue_id=envelope.queue_id)

        def finished(outcomes: list[Outcome]) -> list[Outcome]:
            forward(outcomes)
            return outcomes

        d = defer.maybeDeferred(agent.deliver, envelope, list(recipients), path, report=forward)
        d.addCallback(mine_only)
        d.addErrback(failed)
        d.addCallback(finished)
        return d

    @staticmethod
    def _merge(
        results: list[list[Outcome]],
        recipients: list[Recipient],
        decided: list[Outcome],
        queue_id: str,
        known: dict[str, Outcome],
    ) -> list[Outcome]:
        """One outcome per recipient, in the recipients' order; a reported one wins."""
        by_addr: dict[str, Outcome] = dict(known)
        for o in decided:
            by_addr.setdefault(o.recipient, o)
        for outcomes in results:
            for o in outcomes:
                by_addr.setdefault(o.recipient, o)
        merged = []
        for r in recipients:
            found = by_addr.get(r.address)
            if found is None:
                log.warn("{queue_id}: no outcome reported for {rcpt}", queue_id=queue_id, rcpt=r.address)
                found = Outcome.temporary(r.address, "delivery agent reported no outcome", 451, "4.3.0")
            merged.append(found)
        return merged
