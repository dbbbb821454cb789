"""
A mail event as the history store's rows.

Owns: which event fields go into which column, the kinds of events the
history keeps (L{KINDS}), the statuses of a message (L{MESSAGE_STATUSES})
and the bounds on every stored text (everything here comes from clients
or remote servers: addresses, reply texts, HELO names).

Must not touch: databases (L{mailhub.history.store} writes the rows),
the mail events themselves.  Pure.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from mailhub.eventlog import json_safe

__all__ = ["EventRow", "event_row", "rejection_id", "KINDS", "MESSAGE_STATUSES", "recipient_domain", "MAX_TEXT", "MAX_ADDRESS"]

#: The longest address kept (RFC 5321's path limit is 256 octets).
MAX_ADDRESS = 320
#: The longest reply text or detail kept.
MAX_TEXT = 1000
#: The longest JSON of the remaining fields kept.
MAX_DATA = 4000

#: Event kinds the history records (the mail events of L{mailhub.maillog},
#: with a delivery that ended the message's life in the queue as
#: C{expired}).  Anything else is recorded under its own name too.
KINDS = (
    "connection", "disconnect", "lost_connection", "timeout", "too_many_errors", "starttls",
    "auth_failed", "reject", "accepted", "pickup", "delivery", "expired", "bounce", "hold",
    "release", "removed",
)

#: A message's state in the history: queued (no outcome yet), held,
#: deferred (a recipient still waits for a retry), sent (every recipient
#: delivered), bounced (at least one recipient failed, none waits),
#: rejected (refused before it was queued), deleted (by an operator).
MESSAGE_STATUSES = ("queued", "held", "deferred", "sent", "bounced", "rejected", "deleted")

#: Fields that have their own column or are bookkeeping.
_COLUMNS = {
    "mail_event", "queue_id", "client", "addr", "from", "sender", "to", "rcpt", "status", "code", "enhanced",
    "dsn", "reason", "text", "format", "rcpts",
}


def _cut(value: Any, limit: int) -> str:
    if value.__class__ is not str:
        value = "" if value is None else str(value)
    return value if len(value) <= limit else value[: limit - 3] + "..."


def recipient_domain(address: str) -> str:
    """The domain of C{address}, lower case (C{""} without one)."""
    return address.rpartition("@")[2].lower() if "@" in address else ""


@dataclass(frozen=True)
class EventRow:
    """One row of the C{events} table (and what the message tables learn from it)."""

    time: float
    kind: str
    queue_id: str | None
    client: str
    sender: str | None
    recipient: str
    domain: str
    status: str
    code: int | None
    enhanced: str
    reason: str
    detail: str
    line: str
    data: str
    #: the recipients an C{accepted} event names (its C{rcpts} field)
    recipients: tuple[str, ...] = ()
    #: the fields in C{data}, parsed (not compared: C{data} says the same)
    fields: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def _reason(event: dict[str, Any]) -> str:
    reason = event.get("reason")
    if isinstance(reason, str) and reason and len(reason) <= 40 and reason.replace("_", "").isalnum():
        return reason
    enhanced = str(event.get("enhanced", "") or "")
    return enhanced[:20]


def event_row(event: dict[str, Any]) -> EventRow | None:
    """
    The row for one twisted.logger event, or C{None} when it is not a
    mail event.  Never raises on odd field values: they are turned into
    bounded strings.
    """
    kind = event.get("mail_event")
    if not kind:
        return None
    kind = _cut(kind, 40)
    when = event.get("log_time")
    try:
        t = float(when) if when is not None else time.time()
    except (TypeError, ValueError):
        t = time.time()
    qid_raw = event.get("queue_id")
    qid = None if qid_raw in (None, "", "-") else _cut(qid_raw, 64)
    client = _cut(event.get("client") or event.get("addr") or "", 64)
    sender_raw = event.get("from", event.get("sender"))
    sender = None if sender_raw is None else _cut(sender_raw, MAX_ADDRESS)
    recipient = _cut(event.get("to") or event.get("rcpt") or "", MAX_ADDRESS)
    status = _cut(event.get("status") or "", 20)
    if kind == "delivery" and event.get("expired"):
        kind = "expired"
    if kind == "reject":
        status = "rejected"
    code_raw = event.get("code")
    code = code_raw if isinstance(code_raw, int) and not isinstance(code_raw, bool) and 0 <= code_raw < 1000 else None
    enhanced = _cut(event.get("enhanced") or event.get("dsn") or "", 20)
    reason = _reason(event) if kind in ("reject", "auth_failed") else ""
    detail = _cut(event.get("text", ""), MAX_TEXT)
    line = _cut(event.get("log_mail_text") or event.get("log_format") or "", MAX_TEXT)
    # the writer thread does this for every event: plain values pass as they are
    rest = {k: v for k, v in event.items() if k not in _COLUMNS and k[:4] != "log_"}
    try:
        data = json.dumps(rest, ensure_ascii=False, default=str)
    except (TypeError, ValueError):  # keys that are not strings, circular values
        rest = {str(k): json_safe(v) for k, v in rest.items()}
        data = json.dumps(rest, ensure_ascii=False, default=str)
    if len(data) > MAX_DATA:
        rest = {"truncated": True}
        data = json.dumps(rest)
    rcpts_raw = event.get("rcpts")
    recipients: tuple[str, ...] = ()
    if isinstance(rcpts_raw, (list, tuple)):
        recipients = tuple(_cut(r, MAX_ADDRESS) for r in rcpts_raw[:1000])
    return EventRow(
        time=t, kind=kind, queue_id=qid, client=client, sender=sender, recipient=recipient,
        domain=recipient_domain(recipient), status=status, code=code, enhanced=enhanced, reason=reason,
        detail=detail, line=line, data=data, recipients=recipients, fields=rest,
    )


def rejection_id(t: float) -> str:
    """
    The id a rejected transaction is listed under (it never had a queue
    id): C{R} and 22 hexadecimal digits, unique across processes and nodes.
    """
    return "R%011x%s" % (int(t * 1000) & 0xFFFFFFFFFFF, os.urandom(5).hex()[:11])
