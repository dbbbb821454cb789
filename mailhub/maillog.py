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
    # The text is made here with str.format (C code, a few microseconds),
    # and the event's log_format is that text with its braces doubled:
    # twisted.logger's own formatting of a template (string.Formatter, in
    # Python) cost about 40 us per event, several times per message, on
    # the reactor thread.  Every field stays in the event for the metrics
    # and the event log; the formatted line is the same.
    try:
        text = format.format_map(fields)
    except Exception:  # a bad template: let twisted.logger report it
        text = None
    if text is not None:
        if "{" in text or "}" in text:
            text = text.replace("{", "{{").replace("}", "}}")
        format = text
    maillog.info(format, mail_event=event, **fields)
