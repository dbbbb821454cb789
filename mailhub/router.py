"""
Routing: which delivery agent gets which recipient of a message.

Owns: the split of one delivery round's recipients by transport (local
domains to the local agent, everything else to the remote agent) and the
merge of the agents' outcomes into one list with exactly one outcome per
recipient given.

Must not touch: retry decisions (the scheduler's), the spool's files (only
asks it for the message path), mailboxes or the network (the agents').
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from .address import AddressError
from .envelope import Envelope, Outcome, Recipient

if TYPE_CHECKING:  # pragma: no cover
    from .spool import Spool

__all__ = ["DeliveryAgent", "Router", "NO_RELAY_TEXT"]

log = Logger()

NO_RELAY_TEXT = "no route to non-local domain: relay not configured"


class DeliveryAgent(Protocol):
    """
    What the router hands recipients to.  Returns one L{Outcome} per
    recipient (delivered / temporary / permanent); never decides to retry.
    """

    def deliver(self, envelope: Envelope, recipients: list[Recipient], message_path: str) -> "Deferred[list[Outcome]]":
        ...


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
        spool: "Spool",
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

    def __call__(self, envelope: Envelope, recipients: list[Recipient]) -> "Deferred[list[Outcome]]":
        local, remote, decided = self.split(recipients)
        path = self.spool.message_path(envelope.queue_id)
        rounds: list[Deferred] = []
        if local:
            rounds.append(self._run(self.local, "local", envelope, local, path))
        if remote:
            if self.remote is None:
                # Trusted clients may relay, but no remote agent exists yet:
                # keep the mail queued (and expire it by the usual rules).
                decided += [Outcome.temporary(r.address, NO_RELAY_TEXT, 451, "4.4.0") for r in remote]
            else:
                rounds.append(self._run(self.remote, "remote", envelope, remote, path))
        d = defer.gatherResults(rounds, consumeErrors=True)
        d.addCallback(self._merge, recipients, decided, envelope.queue_id)
        return d

    def _run(
        self, agent: DeliveryAgent, name: str, envelope: Envelope, recipients: list[Recipient], path: str
    ) -> Deferred:
        """One agent's round; its outcomes filtered to its own recipients, its errors made temporary."""
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

        d = defer.maybeDeferred(agent.deliver, envelope, list(recipients), path)
        d.addCallback(mine_only)
        d.addErrback(failed)
        return d

    @staticmethod
    def _merge(
        results: list[list[Outcome]], recipients: list[Recipient], decided: list[Outcome], queue_id: str
    ) -> list[Outcome]:
        """One outcome per recipient, in the recipients' order."""
        by_addr: dict[str, Outcome] = {}
        for o in decided:
            by_addr.setdefault(o.recipient, o)
        for outcomes in results:
            for o in outcomes:
                by_addr.setdefault(o.recipient, o)
        merged = []
        for r in recipients:
            o = by_addr.get(r.address)
            if o is None:
                log.warn("{queue_id}: no outcome reported for {rcpt}", queue_id=queue_id, rcpt=r.address)
                o = Outcome.temporary(r.address, "delivery agent reported no outcome", 451, "4.3.0")
            merged.append(o)
        return merged
