"""
The status page: one self-contained HTML page with the queue size and the
throughput of the last hour as inline SVG charts, and the latest
deliveries and bounces.

Owns: the HTML and SVG, drawn on the server from L{MailMetrics.history}
and L{MailMetrics.recent} (no script, no external CDN, no web fonts: it
renders in a text browser and under a strict Content-Security-Policy).
Every value from mail (addresses, reply texts, queue ids) is written
through L{html.escape}: addresses are chosen by whoever sends mail.

Must not touch: the metrics themselves, the spool, the network.
"""

from __future__ import annotations

import datetime
import html
from collections.abc import Sequence
from typing import Any

from mailhub import __version__
from mailhub.metrics import MailMetrics, MinuteBucket

__all__ = ["StatusPage", "svg_line_chart", "svg_bar_chart"]

_W, _H, _PAD = 560, 160, 30


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _time(ts: Any) -> str:
    try:
        return datetime.datetime.fromtimestamp(float(ts), datetime.UTC).strftime("%H:%M:%S")
    except (TypeError, ValueError, OverflowError, OSError):
        return "-"


def _axes(title: str, top: float, n: int, unit: str = "min") -> list[str]:
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" aria-label="{_e(title)}" '
        f'width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}">',
        f"<title>{_e(title)}</title>",
        f'<rect x="0" y="0" width="{_W}" height="{_H}" fill="#ffffff" stroke="#cccccc"/>',
        f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - 5}" y2="{_H - _PAD}" stroke="#444444"/>',
        f'<line x1="{_PAD}" y1="5" x2="{_PAD}" y2="{_H - _PAD}" stroke="#444444"/>',
        f'<text x="{_PAD - 4}" y="12" font-size="10" text-anchor="end" fill="#333333">{_e(_fmt(top))}</text>',
        f'<text x="{_PAD - 4}" y="{_H - _PAD}" font-size="10" text-anchor="end" fill="#333333">0</text>',
        f'<text x="{_PAD}" y="{_H - 10}" font-size="10" fill="#333333">-{n} {_e(unit)}</text>',
        f'<text x="{_W - 5}" y="{_H - 10}" font-size="10" text-anchor="end" fill="#333333">now</text>',
    ]
    return parts


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.1f}"


def _x(i: int, n: int) -> float:
    return _PAD + (_W - 5 - _PAD) * (i / max(1, n - 1))


def _y(v: float, top: float) -> float:
    return (_H - _PAD) - (_H - _PAD - 15) * (v / top if top else 0)


def svg_line_chart(title: str, values: Sequence[float | None], color: str = "#1f77b4") -> str:
    """A line chart of C{values} (one per minute; C{None}: no sample, the line skips it)."""
    n = len(values)
    top = max([v for v in values if v is not None] + [1])
    parts = _axes(title, top, n)
    points = [f"{_x(i, n):.1f},{_y(v, top):.1f}" for i, v in enumerate(values) if v is not None]
    if points:
        parts.append(f'<polyline class="series" fill="none" stroke="{color}" stroke-width="2" points="{" ".join(points)}"/>')
        # a dot per sample, so one sample (a fresh start) is visible too
        for p in points:
            x, y = p.split(",")
            parts.append(f'<circle cx="{x}" cy="{y}" r="2.5" fill="{color}"/>')
    parts.append("</svg>")
    return "".join(parts)


def svg_bar_chart(title: str, series: Sequence[tuple[str, str, Sequence[int]]], unit: str = "min") -> str:
    """Stacked bars per C{unit} (minute, hour, day); C{series} is (label, colour, values)."""
    n = len(series[0][2]) if series else 0
    totals = [sum(s[2][i] for s in series) for i in range(n)]
    top = max(totals + [1])
    parts = _axes(title, top, n, unit)
    width = max(1.0, (_W - 5 - _PAD) / max(1, n) - 1)
    for i in range(n):
        base = 0
        for label, color, values in series:
            v = values[i]
            if v:
                y0, y1 = _y(base, top), _y(base + v, top)
                x = _PAD + (_W - 5 - _PAD) * i / max(1, n)
                parts.append(
                    f'<rect class="bar" x="{x:.1f}" y="{y1:.1f}" width="{width:.1f}" height="{y0 - y1:.1f}" '
                    f'fill="{color}"><title>{_e(label)}: {v}</title></rect>'
                )
                base += v
    legend_x = _PAD + 10
    for label, color, _ in series:
        parts.append(f'<rect x="{legend_x}" y="8" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{legend_x + 14}" y="17" font-size="11" fill="#333333">{_e(label)}</text>')
        legend_x += 90
    parts.append("</svg>")
    return "".join(parts)


_CSS = """
body{font-family:sans-serif;margin:1.5em;color:#222;background:#f7f7f7}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.5em}
table{border-collapse:collapse;background:#fff;font-size:.85em}
td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}
th{background:#e8e8e8}.sent{color:#1a7f37}.deferred{color:#9a6700}.bounced{color:#cf222e}
.charts{display:flex;flex-wrap:wrap;gap:1em}.num{font-size:1.6em;font-weight:bold}
.cards{display:flex;gap:2em}.card{background:#fff;border:1px solid #ccc;padding:.5em 1em}
"""


class StatusPage:
    """Renders the page from a L{MailMetrics}; the HTTP resource calls L{render_html}."""

    def __init__(self, metrics: MailMetrics, hostname: str) -> None:
        self.metrics = metrics
        self.hostname = hostname

    #: the history's part of the page (L{mailhub.web.history.HistoryRoutes}), when there is a history
    history: Any = None

    def render_html(self, history_html: str = "", refresh: int = 60) -> bytes:
        """
        The page; C{history_html} (drawn from the history store by
        L{mailhub.web.history}) goes after the live charts, and the page
        reloads itself every C{refresh} seconds (a meta refresh: no script).
        """
        m = self.metrics
        m.sample()
        history: list[MinuteBucket] = m.history()
        size, oldest = m.queue_stats()
        age = max(0.0, m.clock.seconds() - oldest) if oldest is not None else 0.0
        queue_chart = svg_line_chart("Queue size (messages), last hour", [b.queue_size for b in history])
        flow_chart = svg_bar_chart(
            "Throughput per minute, last hour",
            [
                ("accepted", "#1f77b4", [b.accepted for b in history]),
                ("sent", "#2ca02c", [b.sent for b in history]),
                ("deferred", "#ff7f0e", [b.deferred for b in history]),
                ("bounced", "#d62728", [b.bounced for b in history]),
            ],
        )
        deliveries = list(reversed(m.recent.deliveries))
        bounces = list(reversed(m.recent.bounces))
        sessions = m.sessions() if m.sessions is not None else {}
        per_process = ", ".join(f"{_e(pid)}: {n}" for pid, n in sorted(sessions.items()))
        out = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="refresh" content="{int(refresh)}">',
            f"<title>mailhub status: {_e(self.hostname)}</title>",
            f"<style>{_CSS}</style></head><body>",
            f"<h1>mailhub on {_e(self.hostname)}</h1>",
            f'<p class="version">mailhub <span id="version">{_e(__version__)}</span></p>',
            '<div class="cards">',
            f'<div class="card">queued<div class="num" id="queue-size">{size}</div></div>',
            f'<div class="card">oldest message<div class="num" id="oldest-age">{_e(_duration(age))}</div></div>',
            f'<div class="card">accepted, last hour<div class="num">{sum(b.accepted for b in history)}</div></div>',
            f'<div class="card">sent, last hour<div class="num">{sum(b.sent for b in history)}</div></div>',
            f'<div class="card">bounced, last hour<div class="num">{sum(b.bounced for b in history)}</div></div>',
            f'<div class="card" title="per process: {per_process}">SMTP sessions'
            f'<div class="num" id="smtp-sessions">{sum(sessions.values())}</div></div>',
            "</div>",
            f'<p id="smtp-processes">SMTP sessions per process (pid: sessions): {per_process or "-"}</p>',
            '<div class="charts">',
            f'<figure id="queue-chart"><figcaption>Queue size, last hour</figcaption>{queue_chart}</figure>',
            f'<figure id="throughput-chart"><figcaption>Messages per minute, last hour</figcaption>{flow_chart}</figure>',
            "</div>",
            history_html,
            f"<h2>Recent deliveries ({len(deliveries)})</h2>",
            '<table id="deliveries"><thead><tr><th>time (UTC)</th><th>queue id</th><th>to</th>'
            "<th>status</th><th>relay</th><th>delay</th><th>dsn</th><th>text</th></tr></thead><tbody>",
        ]
        for d in deliveries:
            status = str(d.get("status", ""))
            out.append(
                "<tr>"
                f"<td>{_e(_time(d.get('time')))}</td><td>{_e(d.get('queue_id'))}</td><td>{_e(d.get('to'))}</td>"
                f'<td class="{_e(status if status in ("sent", "deferred", "bounced") else "")}">{_e(status)}</td>'
                f"<td>{_e(d.get('relay'))}</td><td>{_e(d.get('delay'))}</td><td>{_e(d.get('dsn'))}</td>"
                f"<td>{_e(d.get('text'))}</td></tr>"
            )
        out.append("</tbody></table>")
        out.append(f"<h2>Recent bounces ({len(bounces)})</h2>")
        out.append(
            '<table id="bounces"><thead><tr><th>time (UTC)</th><th>queue id</th><th>notification</th>'
            "<th>bounce queue id</th></tr></thead><tbody>"
        )
        for b in bounces:
            out.append(
                f"<tr><td>{_e(_time(b.get('time')))}</td><td>{_e(b.get('queue_id'))}</td>"
                f"<td>{_e(b.get('kind'))}</td><td>{_e(b.get('dsn_id'))}</td></tr>"
            )
        out.append("</tbody></table>")
        out.append('<p><a href="/metrics">Prometheus metrics</a></p></body></html>')
        return "\n".join(out).encode("utf-8")


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"
