"""
The mail log: one structured event per step of a message's life.

Owns: the names and fields of mail events.  Every event is a
C{twisted.logger} event in the C{mailhub.mail} namespace carrying
C{queue_id} (when there is one) and C{mail_event}, and whose text reads
like a Postfix mail log line, so an operator can C{grep QUEUEID} the log
and read the whole story of one message.

Must not touch: anything but logging.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

__all__ = ["maillog", "mail_event"]

maillog = Logger(namespace="mailhub.mail")


def mail_event(event: str, format: str, **fields: Any) -> None:
    """
    Emit mail event C{event} (e.g. C{"accepted"}, C{"delivery"},
    C{"bounce"}).  C{format} is a twisted.logger format string over
    C{fields}; by convention it starts with C{"{queue_id}: "} when the
    event is about a queued message.
    """
    fields.setdefault("queue_id", "-")
    maillog.info(format, mail_event=event, **fields)
