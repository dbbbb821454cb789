"""
Deliver on accept: a message whose every recipient is local and
deliverable now is written straight into the recipients' Maildirs at the
end of its data, and answered 250 once those files are durable -- one
file per recipient instead of a queue file, a round through the
scheduler and a delivery process (docs/delivery.rst, "Deliver on accept").

Owns: L{DirectDelivery}, the SMTP factory's committer
(L{mailhub.queue.commit.Committer}) when C{local.deliver_on_accept} is
on: the choice of the path per message (L{DirectDelivery.targets}), the
hand-over to the writer thread (L{mailhub.delivery.directwriter}), and
what the mail log says: the C{accepted} line, one C{delivery} line per
recipient (C{relay=local}, the same fields as the scheduler's), and
C{removed}, in that order, before the 250.  L{committer_for} builds the
committer from the configuration (the daemon, and any process serving
SMTP).

The spool path (L{SpoolCommitter}) takes everything that cannot be
finished at once: a recipient that is not local, system mode (its
mailboxes need the privileged delivery processes), more than
C{max_recipients} recipients (one queue file and delivery after the 250
answer sooner than that many fsync'd copies), a NOTIFY=SUCCESS request
(the scheduler sends the notice), a message an end-of-data check put on
hold (C{envelope.held}), a recipient the directory does not map to a
Maildir.  When some copies were written and others were not (a full
mailbox, a file-system error, a forwarding loop), the queue file is
committed with the written recipients marked delivered and the rest
pending, so the 250 still means "on disk" and nothing is delivered twice
by mailhub.  A crash before the 250 may leave copies whose client never
heard of them; the client sends the message again (SMTP's duplicate, as
for a crash between a queue commit and its 250).

Must not touch: the session and its reply (the session answers when the
Deferred fires), the Maildir files (L{mailhub.delivery.directwriter},
L{mailhub.delivery.maildir}), the spool's files (only through the
writer and the spool committer), retries (the scheduler's).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from mailhub.address import AddressError
from mailhub.delivery.directwriter import BatchWriter, Placement, Target
from mailhub.delivery.errors import RecipientError
from mailhub.delivery.maildir import MaildirWriter
from mailhub.envelope import PENDING, Envelope, Outcome
from mailhub.maillog import mail_event
from mailhub.queue.commit import Committer, SpoolCommitter, log_accepted
from mailhub.queue.durable import FILE_SYSTEMS
from mailhub.queue.scheduler import log_delivery
from mailhub.queue.spool import SpoolWriter

__all__ = ["DirectDelivery", "committer_for", "MAX_RECIPIENTS", "DELIVERED_TEXT"]

log = Logger()

#: Messages with more recipients than this go through the spool, per
#: C{spool.sync}: with fsync the copies of one message are fsync'd at the
#: same time, and two recipients still answered sooner on accept than
#: through a queue file, five did not (measured with smtp-source,
#: docs/delivery.rst, "Deliver on accept"); with syncfs a copy costs a
#: file write and the round one syncfs(), and five copies still answered
#: sooner than the queue file.
MAX_RECIPIENTS = {"fsync": 2, "syncfs": 5}

#: The text of a delivered outcome, as the local delivery agent says it.
DELIVERED_TEXT = "delivered to maildir"


class DirectDelivery:
    """
    The committer that delivers on accept, or hands the message to the
    spool path.

    @param spool: today's path, for what cannot be finished at once.
    @param directory: the live L{mailhub.delivery.directory.Directory}.
    @param clock: C{seconds()} for the delivery lines.
    @param writer: the L{BatchWriter} (one per process).
    @param max_recipients: more go through the spool (L{MAX_RECIPIENTS}).
    """

    def __init__(
        self, spool: SpoolCommitter, directory: Any, clock: Any, writer: BatchWriter,
        max_recipients: int = MAX_RECIPIENTS["fsync"],
    ) -> None:
        self.spool = spool
        self.directory = directory
        self.clock = clock
        self.writer = writer
        self.max_recipients = max_recipients

    def targets(self, envelope: Envelope) -> list[Target] | str:
        """Every recipient's Maildir, or why the message takes the spool path."""
        recipients = envelope.recipients
        if envelope.held:
            return "held"
        if not recipients or len(recipients) > self.max_recipients:
            return f"{len(recipients)} recipients"
        directory = self.directory
        if getattr(directory, "mode", "virtual") != "virtual":
            return "system mailboxes"
        targets = []
        for r in recipients:
            if r.state != PENDING:
                return "not pending"
            if any(n.upper() == "SUCCESS" for n in r.notify):
                return "NOTIFY=SUCCESS"
            at = r.address.rfind("@")
            try:
                if at <= 0 or not directory.is_local(r.address[at + 1 :]):
                    return "not local"
                root, domain, local = directory.mailbox_location(r.address)
                may_create = directory.may_create(r.address)
            except (AddressError, RecipientError) as e:
                return f"no maildir: {e}"
            targets.append(Target(r.address, root, domain, local, may_create))
        return targets

    def commit(self, envelope: Envelope, writer: SpoolWriter, log_fields: dict[str, str]) -> defer.Deferred[None]:
        """L{Committer.commit}: straight into the Maildirs when every recipient allows it."""
        targets = self.targets(envelope)
        if isinstance(targets, str):
            return self.spool.commit(envelope, writer, log_fields)
        placement = Placement(
            envelope.queue_id, envelope.arrival, envelope.sender, targets, writer, bool(envelope.esmtp.get("crlf"))
        )
        d: defer.Deferred[Any] = self.writer.submit(placement)
        d.addCallback(self._placed, envelope, writer, log_fields)
        return d

    def _placed(
        self, placement: Placement, envelope: Envelope, writer: SpoolWriter, log_fields: dict[str, str]
    ) -> defer.Deferred[None] | None:
        now = self.clock.seconds()
        done = [envelope.apply(Outcome.delivered(a, DELIVERED_TEXT), now) for a in placement.placed]

        def log_deliveries() -> None:
            for r in done:
                log_delivery(envelope, r, now, "local")

        if not placement.failed:
            log_accepted(envelope, log_fields)
            log_deliveries()
            mail_event("removed", "{queue_id}: removed", queue_id=envelope.queue_id)
            return None
        for address, why in placement.failed.items():
            log.info(
                "{queue_id}: to=<{to}>: not delivered on accept ({why}); queued",
                queue_id=envelope.queue_id, to=address, why=why,
            )
        return self.spool.commit(envelope, writer, log_fields, before_enqueue=log_deliveries)


def committer_for(config: Any, directory: Any, reactor: Any, run: Any, enqueue: Any) -> Committer:
    """
    The committer of a process serving SMTP: L{DirectDelivery} when
    C{local.deliver_on_accept} is on, mailboxes are virtual and local mail
    is written here (not handed to an LMTP server), else the spool path.  C{run}: how the spool's commit is called (a thread);
    C{reactor}: its C{callFromThread} answers the writer thread.
    """
    spool = SpoolCommitter(run, enqueue)
    local = config.local
    if not local.deliver_on_accept or local.mode != "virtual" or local.transport != "maildir":
        return spool
    syncfs = config.spool.sync == "syncfs"
    maildir = MaildirWriter(config.server.hostname, config.spool.fsync, FILE_SYSTEMS if syncfs else None)
    writer = BatchWriter(maildir, reactor.callFromThread)
    return DirectDelivery(spool, directory, reactor, writer, MAX_RECIPIENTS[config.spool.sync])
