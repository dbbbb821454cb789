"""
The history over HTTP: C{GET /v1/messages} (a filtered, paginated list),
C{GET /v1/messages/ID} for a message that left the queue, C{GET /v1/stats}
(counts per status per time bucket, latency percentiles, top lists) and the
status page's history section (charts over the last hour, day or week).

Owns: reading the query parameters into L{mailhub.history.query.Filters}
(bad values are a C{400} with the API's JSON error), who sees what (a user
their own messages, an administrator everything and the statistics), and
the HTML of the status page's history section: inline SVG, no script, so
the page keeps its strict Content-Security-Policy; the range switch is
plain links (C{?range=hour|day|week}) and the page reloads itself (meta
refresh) while it is open.

Must not touch: the store's SQL (L{mailhub.history.query} asks), the
routes and authentication (L{mailhub.web.api} dispatches here).  Every
query runs through C{run} (a thread in the daemon).
"""

from __future__ import annotations

import datetime
import html
from collections.abc import Callable
from typing import Any

from twisted.internet import defer

from mailhub.history import query
from mailhub.history.query import Filters, QueryError
from mailhub.web.api import HttpError
from mailhub.web.statuspage import svg_bar_chart

__all__ = ["HistoryRoutes", "render_history"]

#: the fields of C{GET /v1/messages/ID}, the same for a queued message (web.api)
MESSAGE_FIELDS = ("queue_id", "state", "sender", "arrival", "next_attempt", "attempts", "size", "recipients")
RECIPIENT_FIELDS = (
    "address", "original", "state", "attempts", "last_code", "last_status", "last_text", "last_attempt", "remote_mta",
)
#: seconds between reloads of the status page per range
REFRESH = {"hour": 30, "day": 60, "week": 300}
_UNITS = {"minute": "min", "hour": "h", "day": "d"}


def _one(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise HttpError(400, f"{name} given more than once")
    return values[0] or None


class HistoryRoutes:
    """
    @param store: L{mailhub.history.store.Store}.
    @param run: C{run(f, *args) -> Deferred} for blocking queries.
    @param is_admin: whether an API user sees everything.
    @param flush: the recorder's C{flush} (written what waits), called
        before a message that left the queue is looked up: its last events
        may still wait in memory for their batch.
    """

    def __init__(
        self, store: Any, run: Callable[..., defer.Deferred[Any]], is_admin: Callable[[str], bool],
        flush: Callable[[], defer.Deferred[Any]] | None = None,
    ) -> None:
        self.store = store
        self.run = run
        self.is_admin = is_admin
        self.flush = flush

    def _filters(self, params: dict[str, list[str]], user: str | None, now: float) -> Filters:
        try:
            since = _one(params, "since")
            until = _one(params, "until")
            return Filters(
                sender=_one(params, "sender"),
                recipient=_one(params, "recipient"),
                domain=_one(params, "domain"),
                status=_one(params, "status"),
                client=_one(params, "client"),
                since=query.parse_time(since, now) if since else None,
                until=query.parse_time(until, now) if until else None,
                user=user,
            )
        except QueryError as e:
            raise HttpError(400, str(e)) from None

    def get_messages(self, params: dict[str, list[str]], user: str, now: float) -> defer.Deferred[Any]:
        filters = self._filters(params, None if self.is_admin(user) else user, now)
        cursor = _one(params, "cursor")
        limit_text = _one(params, "limit") or "100"
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= query.MAX_LIMIT:
            raise HttpError(400, f"limit must be 1 to {query.MAX_LIMIT}")
        if cursor is not None:
            try:
                query.decode_cursor(cursor)
            except QueryError as e:
                raise HttpError(400, str(e)) from None

        def answer(found: tuple[list[dict[str, Any]], str | None]) -> Any:
            messages, nxt = found
            return (200, {"messages": messages, "count": len(messages), "next_cursor": nxt})

        return self.run(query.list_messages, self.store, filters, int(limit_text), cursor).addCallback(answer)

    def get_message(self, qid: str, user: str) -> defer.Deferred[Any]:
        def lookup() -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
            return query.message_json(self.store, qid), query.story(self.store, qid, follow=False)

        def answer(found: tuple[dict[str, Any] | None, list[dict[str, Any]]]) -> Any:
            data, events = found
            if data is None or not (self.is_admin(user) or str(data.get("user", "")).lower() == user.lower()):
                raise HttpError(404, "no such message")
            # exactly the fields of a queued message (web.api), nothing more
            out = {k: data[k] for k in MESSAGE_FIELDS}
            out["recipients"] = [{k: r[k] for k in RECIPIENT_FIELDS} for r in data["recipients"]]
            notices = [e for e in events if e["event"] == "bounce" and e["fields"].get("dsn_id")]
            out["bounces"] = [e["fields"]["dsn_id"] for e in notices if "delay" not in str(e["fields"].get("kind"))]
            out["delay_notices"] = [e["fields"]["dsn_id"] for e in notices if "delay" in str(e["fields"].get("kind"))]
            return (200, out)

        d: defer.Deferred[Any] = self.flush() if self.flush is not None else defer.succeed(None)
        return d.addCallback(lambda _: self.run(lookup)).addCallback(answer)

    def get_stats(self, params: dict[str, list[str]], user: str, now: float) -> defer.Deferred[Any]:
        if not self.is_admin(user):
            raise HttpError(403, "statistics are for administrators (http admins)")
        try:
            since = _one(params, "since")
            until = _one(params, "until")
            start = query.parse_time(since, now) if since else None
            end = query.parse_time(until, now) if until else None
            bucket = _one(params, "bucket") or "hour"
            if bucket not in query.BUCKETS:
                raise QueryError(f"unknown bucket (one of {', '.join(query.BUCKETS)})")
        except QueryError as e:
            raise HttpError(400, str(e)) from None

        def ask() -> dict[str, Any]:
            try:
                return query.stats(self.store, start, end, bucket, now)
            except QueryError as e:
                raise HttpError(400, str(e)) from None

        return self.run(ask).addCallback(lambda data: (200, data))

    def page(self, status_page: Any, chosen: str, now: float) -> defer.Deferred[bytes]:
        """The status page with its history section for range C{chosen} (hour, day, week)."""
        if chosen not in query.RANGES:
            chosen = "hour"
        seconds, bucket = query.RANGES[chosen]
        width = query.BUCKETS[bucket]
        end = (now // width + 1) * width  # the current bucket included, whole buckets shown
        d = self.run(query.stats, self.store, end - seconds, end, bucket, now)

        def draw(data: dict[str, Any]) -> bytes:
            return status_page.render_html(render_history(data, chosen), REFRESH[chosen])

        def failed(f: Any) -> bytes:
            text = f'<p class="history-error" id="history-error">history unavailable: {html.escape(str(f.value)[:200])}</p>'
            return status_page.render_html(text, REFRESH[chosen])

        return d.addCallbacks(draw, failed)


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _seconds(value: Any) -> str:
    if value is None:
        return "-"
    v = float(value)
    if v < 60:
        return f"{v:.1f}s"
    if v < 3600:
        return f"{v / 60:.1f}m"
    return f"{v / 3600:.1f}h"


def _top_table(ident: str, title: str, rows: list[dict[str, Any]]) -> str:
    out = [f'<table id="{ident}"><caption>{_e(title)}</caption><thead><tr><th>name</th><th>count</th></tr></thead><tbody>']
    for r in rows:
        out.append(f"<tr><td>{_e(r['name'] or '-')}</td><td>{int(r['count'])}</td></tr>")
    out.append("</tbody></table>")
    return "".join(out)


def render_history(data: dict[str, Any], chosen: str) -> str:
    """The history section of the status page from L{query.stats}' answer."""
    buckets = data["buckets"]
    unit = _UNITS[data["bucket"]]
    chart = svg_bar_chart(
        f"Messages per {data['bucket']}, last {chosen}",
        [
            ("accepted", "#1f77b4", [b["accepted"] for b in buckets]),
            ("delivered", "#2ca02c", [b["sent"] for b in buckets]),
            ("deferred", "#ff7f0e", [b["deferred"] for b in buckets]),
            ("bounced", "#d62728", [b["bounced"] for b in buckets]),
            ("rejected", "#7f7f7f", [b["rejected"] for b in buckets]),
        ],
        unit,
    )
    links = []
    for name in query.RANGES:
        if name == chosen:
            links.append(f'<strong id="range-current">{_e(name)}</strong>')
        else:
            links.append(f'<a class="range" id="range-{_e(name)}" href="?range={_e(name)}">last {_e(name)}</a>')
    totals = data["totals"]
    lat = data["latency"]
    since = datetime.datetime.fromtimestamp(data["since"], datetime.UTC).strftime("%Y-%m-%d %H:%M")
    return "".join([
        '<section id="history">',
        f"<h2>History, last {_e(chosen)} (since {_e(since)} UTC)</h2>",
        f'<p class="ranges">{" | ".join(links)}</p>',
        '<div class="cards">',
        *(f'<div class="card">{_e(k)}<div class="num" id="history-{_e(k)}">{int(v)}</div></div>' for k, v in totals.items()),
        "</div>",
        f'<figure id="history-chart"><figcaption>Messages per {_e(data["bucket"])}</figcaption>{chart}</figure>',
        '<table id="latency"><caption>Delivery latency (arrival to delivered)</caption><thead><tr>'
        "<th>messages</th><th>p50</th><th>p90</th><th>p99</th></tr></thead><tbody>",
        f"<tr><td>{int(lat['count'])}</td><td>{_seconds(lat['p50'])}</td><td>{_seconds(lat['p90'])}</td>"
        f"<td>{_seconds(lat['p99'])}</td></tr></tbody></table>",
        '<div class="charts">',
        _top_table("top-domains", "Top destination domains", data["top_domains"]),
        _top_table("top-deferred-domains", "Top domains by deferrals", data["top_deferred_domains"]),
        _top_table("top-rejected-clients", "Top rejected clients", data["top_rejected_clients"]),
        _top_table("top-reject-reasons", "Top reject reasons", data["top_reject_reasons"]),
        "</div></section>",
    ])
