"""
The commit of an accepted message: what stands between the end of its
data (and of the end-of-data checks) and the session's C{250}.

Owns: the L{Committer} contract -- the SMTP factory's C{committer}: its
C{commit(envelope, writer, log_fields)} returns a Deferred that fires
once the message is durable ("durable before 250") and fails otherwise
(the session answers 451) -- and L{SpoolCommitter}, the path through the
queue: the queue file committed by the spool in C{run} (a thread), the
mail log's C{accepted} line (L{log_accepted}), then the scheduler's
C{enqueue}.  L{mailhub.delivery.direct.DirectDelivery} is the other
committer (deliver on accept); it uses this one for what it cannot
finish at once.

Must not touch: the session and its replies, the spool's files (only
through the L{SpoolWriter}), delivery.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger

from mailhub.envelope import Envelope
from mailhub.maillog import mail_event
from mailhub.queue.spool import SpoolWriter

__all__ = ["Committer", "SpoolCommitter", "log_accepted"]

log = Logger()


class Committer(Protocol):
    """Makes an accepted message durable; the session answers 250 when the Deferred fires."""

    def commit(self, envelope: Envelope, writer: SpoolWriter, log_fields: dict[str, str]) -> defer.Deferred[None]:
        """
        Commit the message C{writer} holds with C{envelope}; the Deferred
        fires once it is durable, and fails (the session answers 451) if
        nothing was committed.  C{log_fields}: the end-of-data checks'
        extra fields of the C{accepted} line.
        """


def log_accepted(envelope: Envelope, log_fields: dict[str, str]) -> None:
    """The mail log's C{accepted} line of a committed message (the first line of its story)."""
    extra = "".join(f" {name}={{{name}}}" for name in log_fields)
    mail_event(
        "accepted",
        "{queue_id}: accepted from=<{sender}> nrcpt={nrcpt} size={size} client=[{client}] proto={proto}"
        " listener={listener} sasl_username={user}" + extra,
        queue_id=envelope.queue_id, sender=envelope.sender, nrcpt=len(envelope.recipients),
        size=envelope.esmtp["size"], client=envelope.client["addr"], proto=envelope.client["protocol"],
        listener=envelope.client["listener"], user=envelope.client["user"],
        rcpts=[r.address for r in envelope.recipients],  # the message history's recipients
        **log_fields, **{"from": envelope.sender},
    )


def _call(f: Callable[..., Any], *args: Any) -> Any:
    return f(*args)


class SpoolCommitter:
    """
    The path through the queue: commit the queue file, log C{accepted},
    hand the envelope to the scheduler.

    @param run: how to call the blocking L{SpoolWriter.commit} (fsyncs):
        C{deferToThread} in the daemon, a direct call by default.
    @param enqueue: called with each committed envelope (the scheduler).
    """

    def __init__(self, run: Callable[..., Any] = _call, enqueue: Callable[[Envelope], None] = lambda env: None) -> None:
        self.run = run
        self.enqueue = enqueue

    def commit(
        self,
        envelope: Envelope,
        writer: SpoolWriter,
        log_fields: dict[str, str],
        before_enqueue: Callable[[], None] | None = None,
    ) -> defer.Deferred[None]:
        """
        L{Committer.commit} through the spool.  C{before_enqueue}: called
        after the C{accepted} line and before the scheduler sees the
        envelope (the deliveries already made, logged in their place).
        """
        d = defer.maybeDeferred(self.run, writer.commit, envelope)
        d.addCallback(self._committed, envelope, log_fields, before_enqueue)
        return d

    def _committed(
        self, _: object, envelope: Envelope, log_fields: dict[str, str], before_enqueue: Callable[[], None] | None
    ) -> None:
        # Logged before enqueue: enqueue may deliver at once, and the story
        # of a message in the log must start with its arrival.
        log_accepted(envelope, log_fields)
        if before_enqueue is not None:
            try:
                before_enqueue()
            except Exception:  # committed all the same: never a 451 now
                log.failure("{queue_id}: error after the commit", queue_id=envelope.queue_id)
        try:
            self.enqueue(envelope)
        except Exception:
            # Committed means queued: the scheduler finds it again at start.
            log.failure("enqueue failed for {queue_id}", queue_id=envelope.queue_id)
