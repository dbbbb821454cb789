"""
The status page in a real browser: headless Chromium loads it from the
HTTP listener on 127.0.0.1, takes a screenshot (checked to be a PNG of the
window size that is not blank) and dumps the rendered DOM (checked for the
two SVG charts and the table rows; a hostile address stays text).
"""

from __future__ import annotations

import struct
import subprocess
import zlib

import pytest
from conftest import in_reactor, require_tool
from twisted.internet.endpoints import serverFromString

from mailhub.metrics import MailMetrics
from mailhub.queue.spool import Spool
from mailhub.web.api import make_http_site

HOSTILE = '<img src=x onerror="document.title=1">@evil.example'


def chromium_args(profile: str) -> list[str]:
    return [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}",
    ]


def png_pixels(data: bytes) -> tuple[int, int, set[bytes]]:
    """Width, height and the set of distinct pixels of an 8-bit RGB/RGBA PNG (no PIL needed)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8 and color in (2, 6), (depth, color)
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * bpp
    prev = bytearray(stride)
    colours: set[bytes] = set()
    i = 0
    for _ in range(height):
        f = raw[i]
        line = bytearray(raw[i + 1 : i + 1 + stride])
        i += 1 + stride
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b = prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            if f == 1:
                line[x] = (line[x] + a) & 0xFF
            elif f == 2:
                line[x] = (line[x] + b) & 0xFF
            elif f == 3:
                line[x] = (line[x] + ((a + b) >> 1)) & 0xFF
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        prev = line
        if len(colours) < 5000:
            for x in range(0, stride, bpp * 3):
                colours.add(bytes(line[x : x + 3]))
    return width, height, colours


@pytest.fixture
def page(reactor, tmp_path):
    spool = Spool(str(tmp_path / "spool"), fsync=False)
    metrics = MailMetrics(reactor, lambda: (7, reactor.seconds() - 125))
    for i in range(12):
        metrics.observe({"mail_event": "accepted", "proto": "ESMTP", "queue_id": f"Q{i}"})
        metrics.observe({"mail_event": "delivery", "status": "sent" if i % 3 else "bounced", "relay": "local",
                         "delay": "2", "queue_id": f"Q{i}", "to": f"user{i}@example.com", "dsn": "2.0.0", "text": "ok"})
    metrics.observe({"mail_event": "delivery", "status": "deferred", "relay": "local", "delay": "2",
                     "queue_id": "QH", "to": HOSTILE, "dsn": "4.2.2", "text": "<b>mailbox full</b>"})
    metrics.observe({"mail_event": "bounce", "kind": "sender non-delivery notification", "queue_id": "Q0", "dsn_id": "DSN0"})
    metrics.sample()
    site = make_http_site(spool, lambda e: None, None, None, metrics, "mx.example.com")
    port = in_reactor(reactor, serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen, site)
    yield f"http://127.0.0.1:{port.getHost().port}/"
    in_reactor(reactor, port.stopListening)


def test_screenshot_is_a_real_page(page, tmp_path):
    chromium = require_tool("chromium")
    shot = tmp_path / "s.png"
    result = subprocess.run(
        [chromium, *chromium_args(str(tmp_path / "profile")), f"--screenshot={shot}", "--window-size=1200,900", page],
        capture_output=True, timeout=60,
    )
    assert shot.exists(), result.stderr.decode(errors="replace")[-2000:]
    width, height, colours = png_pixels(shot.read_bytes())
    assert (width, height) == (1200, 900)
    # white background, text, table borders, four bar colours and the line: far from blank
    assert len(colours) > 20, len(colours)
    assert bytes((0x2C, 0xA0, 0x2C)) in colours or any(abs(c[0] - 0x2C) < 8 and abs(c[1] - 0xA0) < 8 for c in colours)


def test_rendered_dom_has_charts_and_rows(page, tmp_path):
    chromium = require_tool("chromium")
    result = subprocess.run(
        [chromium, *chromium_args(str(tmp_path / "profile")), "--dump-dom", page],
        capture_output=True, timeout=60,
    )
    dom = result.stdout.decode("utf-8", errors="replace")
    assert "<title>mailhub status: mx.example.com</title>" in dom, result.stderr.decode(errors="replace")[-2000:]
    assert dom.count("<svg") == 2
    assert dom.count('class="bar"') >= 2 and 'class="series"' in dom
    deliveries = dom.split('id="deliveries"')[1].split("</table>")[0]
    assert deliveries.count("<tr>") == 1 + 13  # header + rows
    bounces = dom.split('id="bounces"')[1].split("</table>")[0]
    assert bounces.count("<tr>") == 2 and "DSN0" in bounces
    assert '<div class="num" id="queue-size">7</div>' in dom
    assert '<div class="num" id="oldest-age">2m 5s</div>' in dom or 'id="oldest-age">2m' in dom
    # the hostile address is text in the DOM, never an element
    assert "&lt;img src=x onerror=" in dom and "<img" not in dom
    assert "&lt;b&gt;mailbox full&lt;/b&gt;" in dom
