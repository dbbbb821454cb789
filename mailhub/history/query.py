"""
Asking the history: lists of messages, one message's story, counts per
time bucket, latency percentiles and the top lists.

Owns: the filters (L{Filters}) and how C{--since 2h} / C{since=} values
are read (L{parse_time}), the opaque pagination cursor, the JSON shapes
the CLI, the HTTP API and the status page share (so the three agree: they
call the same functions) and the SQL of every question.

Must not touch: writing (L{mailhub.history.store}), the reactor: every
function blocks and is called in a thread by the daemon.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import dataclass
from typing import Any

from mailhub.configcheck import parse_duration
from mailhub.history.rows import MESSAGE_STATUSES
from mailhub.history.store import Store

__all__ = [
    "Filters", "QueryError", "parse_time", "list_messages", "message_json", "story", "stats",
    "BUCKETS", "RANGES", "encode_cursor", "decode_cursor",
]

#: the widest page of a list
MAX_LIMIT = 1000
#: bucket names and their seconds
BUCKETS = {"minute": 60, "hour": 3600, "day": 86400}
#: the status page's ranges: seconds and bucket
RANGES = {"hour": (3600, "minute"), "day": (86400, "hour"), "week": (7 * 86400, "day")}
#: at most this many buckets in one answer
MAX_BUCKETS = 2000
#: entries of each top list
TOP = 10

_COLUMNS = (
    "queue_id, time, updated, sender, client, username, proto, size, nrcpt, status, held, reason, detail,"
    " finished, latency, bounce_of, node"
)
_NAMES = [c.strip() for c in _COLUMNS.split(",")]
_STATE = {"sent": "delivered", "bounced": "failed", "rejected": "failed"}


class QueryError(ValueError):
    """A filter or cursor that cannot be used (its text is for the user)."""


def parse_time(value: str, now: float) -> float:
    """
    A point in time: a duration back from now (C{2h}, C{30m}, C{7d},
    C{90}), POSIX seconds (C{1764000000}) or an ISO 8601 date or time
    (C{2026-12-01}, C{2026-12-01T10:00:00Z}; UTC unless it says otherwise).
    """
    import datetime

    text = value.strip()
    if not text or len(text) > 40:
        raise QueryError(f"not a time: {text[:40]!r}")
    try:
        if text.replace(".", "", 1).isdigit() and float(text) > 10**8:
            return float(text)
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise QueryError(f"not a time (2h, 7d, 2026-12-01, 2026-12-01T10:00:00Z): {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


@dataclass(frozen=True)
class Filters:
    """What a list of messages is narrowed to; C{None}: any."""

    sender: str | None = None
    recipient: str | None = None  # an address
    domain: str | None = None  # a recipient domain
    status: str | None = None
    client: str | None = None
    since: float | None = None
    until: float | None = None
    user: str | None = None  # only this user's messages (a non-admin API user)

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in MESSAGE_STATUSES:
            raise QueryError(f"unknown status {self.status[:20]!r} (one of {', '.join(MESSAGE_STATUSES)})")
        for name in ("sender", "recipient", "domain", "client", "user"):
            value = getattr(self, name)
            if value is not None and len(value) > 320:
                raise QueryError(f"{name} too long")

    def where(self) -> tuple[str, list[Any]]:
        parts: list[str] = []
        params: list[Any] = []
        if self.sender is not None:
            parts.append("LOWER(m.sender) = ?")
            params.append(self.sender.lower())
        if self.recipient is not None:
            parts.append("EXISTS (SELECT 1 FROM recipients r WHERE r.queue_id = m.queue_id AND LOWER(r.address) = ?)")
            params.append(self.recipient.lower())
        if self.domain is not None:
            parts.append("EXISTS (SELECT 1 FROM recipients r WHERE r.queue_id = m.queue_id AND r.domain = ?)")
            params.append(self.domain.lower().rstrip("."))
        if self.status is not None:
            parts.append("m.status = ?")
            params.append(self.status)
        if self.client is not None:
            parts.append("m.client = ?")
            params.append(self.client)
        if self.since is not None:
            parts.append("m.time >= ?")
            params.append(self.since)
        if self.until is not None:
            parts.append("m.time < ?")
            params.append(self.until)
        if self.user is not None:
            parts.append("LOWER(m.username) = ?")
            params.append(self.user.lower())
        return (" AND ".join(parts) or "1 = 1"), params


def encode_cursor(t: float, qid: str) -> str:
    raw = json.dumps([t, qid]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        if len(cursor) > 200:
            raise ValueError
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        t, qid = json.loads(raw)
        if not isinstance(t, (int, float)) or not isinstance(qid, str):
            raise ValueError
        return float(t), qid
    except (ValueError, TypeError, binascii.Error):
        raise QueryError("invalid cursor") from None


def _summary(row: tuple[Any, ...]) -> dict[str, Any]:
    m = dict(zip(_NAMES, row, strict=True))
    m["held"] = bool(m["held"])
    m["user"] = m.pop("username")
    return m


def list_messages(
    store: Store, filters: Filters, limit: int = 100, cursor: str | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """
    Messages matching C{filters}, newest first, at most C{limit}; and the
    cursor of the next page (C{None}: this was the last).  Each has its
    recipients' addresses and states.
    """
    limit = max(1, min(MAX_LIMIT, limit))
    where, params = filters.where()
    if cursor:
        t, qid = decode_cursor(cursor)
        where += " AND (m.time < ? OR (m.time = ? AND m.queue_id < ?))"
        params += [t, t, qid]
    rows = store.fetch(
        f"SELECT {', '.join('m.' + n for n in _NAMES)} FROM messages m WHERE {where}"
        " ORDER BY m.time DESC, m.queue_id DESC LIMIT ?",
        [*params, limit + 1],
    )
    more = len(rows) > limit
    messages = [_summary(r) for r in rows[:limit]]
    if messages:
        ids = [m["queue_id"] for m in messages]
        marks = ", ".join("?" for _ in ids)
        recipients: dict[str, list[dict[str, Any]]] = {}
        for qid, address, status in store.fetch(
            f"SELECT queue_id, address, status FROM recipients WHERE queue_id IN ({marks}) ORDER BY address", ids
        ):
            recipients.setdefault(qid, []).append({"address": address, "status": status})
        for m in messages:
            m["recipients"] = recipients.get(m["queue_id"], [])
    nxt = encode_cursor(messages[-1]["time"], messages[-1]["queue_id"]) if more and messages else None
    return messages, nxt


def message_json(store: Store, qid: str) -> dict[str, Any] | None:
    """
    One message in the shape C{GET /v1/messages/ID} gives a queued one
    (web.api), plus the history's own fields (C{status}, C{client},
    C{finished}, C{latency}); C{None}: not in the history.
    """
    rows = store.fetch(f"SELECT {_COLUMNS} FROM messages WHERE queue_id = ?", [qid])
    if not rows:
        return None
    m = _summary(rows[0])
    recipients = []
    for address, status, t, code, enhanced, relay, attempts, detail, original in store.fetch(
        "SELECT address, status, time, code, enhanced, relay, attempts, detail, original FROM recipients"
        " WHERE queue_id = ? ORDER BY address", [qid],
    ):
        recipients.append({
            "address": address,
            "original": original or address,
            "state": _STATE.get(status, "pending"),
            "attempts": attempts,
            "last_code": code,
            "last_status": enhanced,
            "last_text": detail,
            "last_attempt": t if status != "queued" else None,
            "remote_mta": relay if relay not in ("local", "none") else "",
            "status": status,
        })
    notices = store.fetch(
        "SELECT queue_id FROM messages WHERE bounce_of = ? ORDER BY time", [qid]
    )
    done = m["status"] in ("sent", "bounced", "rejected", "deleted")
    return {
        "queue_id": qid,
        "state": "done" if done else ("held" if m["held"] else "queued"),
        "sender": m["sender"],
        "arrival": m["time"],
        "next_attempt": None,
        "attempts": max((r["attempts"] for r in recipients), default=0),
        "size": m["size"],
        "recipients": recipients,
        "status": m["status"],
        "client": m["client"],
        "user": m["user"],
        "finished": m["finished"],
        "latency": m["latency"],
        "bounce_of": m["bounce_of"] or None,
        "notices": [n[0] for n in notices],
        "node": m["node"],
    }


def story(store: Store, qid: str, follow: bool = True) -> list[dict[str, Any]]:
    """
    Every event of C{qid} in order, and (C{follow}) those of the
    notifications it caused (a C{bounce} event's C{dsn_id}).
    """
    wanted = [qid]
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    while wanted and len(seen) < 20:
        current = wanted.pop(0)
        if current in seen:
            continue
        seen.add(current)
        for t, kind, q, client, sender, rcpt, status, code, enhanced, reason, detail, line, data, node in store.fetch(
            "SELECT time, kind, queue_id, client, sender, recipient, status, code, enhanced, reason, detail, line,"
            " data, node FROM events WHERE queue_id = ? ORDER BY time, id", [current],
        ):
            try:
                extra = json.loads(data)
            except ValueError:
                extra = {}
            record = {
                "time": t, "event": kind, "queue_id": q, "client": client, "sender": sender, "recipient": rcpt,
                "status": status, "code": code, "enhanced": enhanced, "reason": reason, "detail": detail,
                "text": line, "node": node, "fields": extra if isinstance(extra, dict) else {},
            }
            out.append(record)
            dsn = extra.get("dsn_id") if isinstance(extra, dict) else None
            if follow and kind == "bounce" and isinstance(dsn, str) and dsn:
                wanted.append(dsn)
    out.sort(key=lambda r: r["time"])
    return out


def _window(since: float | None, until: float | None, now: float, default: float) -> tuple[float, float]:
    end = until if until is not None else now
    start = since if since is not None else end - default
    if start >= end:
        raise QueryError("since must be before until")
    return start, end


def stats(
    store: Store, since: float | None = None, until: float | None = None, bucket: str = "hour",
    now: float | None = None,
) -> dict[str, Any]:
    """
    Counts per status per time bucket (accepted, sent, deferred, bounced,
    rejected: events, so a message deferred twice counts twice), delivery
    latency percentiles, top destination domains (by volume, by
    deferrals), top rejected clients and reasons, from C{since} to
    C{until} (default: the last day).
    """
    if bucket not in BUCKETS:
        raise QueryError(f"unknown bucket {bucket[:20]!r} (one of {', '.join(BUCKETS)})")
    now = time.time() if now is None else now
    start, end = _window(since, until, now, 86400.0)
    width = BUCKETS[bucket]
    first, last = int(start // width), int(end // width) - (1 if end % width == 0 else 0)
    if last - first + 1 > MAX_BUCKETS:
        raise QueryError(f"too many buckets ({last - first + 1}); use a wider bucket or a shorter range")
    names = ("accepted", "sent", "deferred", "bounced", "rejected")
    series = {k: {n: 0 for n in names} for k in range(first, last + 1)}
    key = store.floor(f"time / {width}")
    for k, kind, status, count in store.fetch(
        f"SELECT {key} AS k, kind, status, COUNT(*) FROM events WHERE time >= ? AND time < ?"
        " AND kind IN ('accepted', 'pickup', 'delivery', 'expired', 'reject') GROUP BY k, kind, status",
        [start, end],
    ):
        name = "accepted" if kind in ("accepted", "pickup") else ("rejected" if kind == "reject" else status)
        if int(k) in series and name in names:
            series[int(k)][name] += int(count)
    buckets = [{"start": k * width, **series[k]} for k in range(first, last + 1)]
    totals = {n: sum(b[n] for b in buckets) for n in names}
    return {
        "since": start,
        "until": end,
        "bucket": bucket,
        "bucket_seconds": width,
        "buckets": buckets,
        "totals": totals,
        "latency": latency(store, start, end),
        "top_domains": _top(store, "domain", "kind IN ('delivery', 'expired') AND domain <> ''", start, end),
        "top_deferred_domains": _top(store, "domain", "kind = 'delivery' AND status = 'deferred'", start, end),
        "top_rejected_clients": _top(store, "client", "kind = 'reject' AND client <> ''", start, end),
        "top_reject_reasons": _top(store, "reason", "kind = 'reject'", start, end),
    }


def _top(store: Store, column: str, condition: str, start: float, end: float) -> list[dict[str, Any]]:
    rows = store.fetch(
        f"SELECT {column}, COUNT(*) AS n FROM events WHERE {condition} AND time >= ? AND time < ?"
        f" GROUP BY {column} ORDER BY n DESC, {column} LIMIT ?",
        [start, end, TOP],
    )
    return [{"name": name, "count": int(n)} for name, n in rows]


def latency(store: Store, start: float, end: float) -> dict[str, Any]:
    """Arrival to last delivery of the messages sent in the window: count, p50, p90, p99 (seconds)."""
    cond = "status = 'sent' AND latency IS NOT NULL AND finished >= ? AND finished < ?"
    count = int(store.fetch(f"SELECT COUNT(*) FROM messages WHERE {cond}", [start, end])[0][0])
    out: dict[str, Any] = {"count": count}
    for name, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        if not count:
            out[name] = None
            continue
        offset = min(count - 1, max(0, int(round(p * count + 0.5)) - 1))  # nearest rank
        rows = store.fetch(f"SELECT latency FROM messages WHERE {cond} ORDER BY latency LIMIT 1 OFFSET ?",
                           [start, end, offset])
        out[name] = float(rows[0][0]) if rows else None
    return out
