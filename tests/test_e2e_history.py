"""
End-to-end: the real daemon records every mail event in its history
database (SQLite, the default); the three ways of asking -- C{mailhub
history}, the HTTP API (C{/v1/messages}, C{/v1/messages/ID}, C{/v1/stats})
and the status page in headless Chromium -- agree on the same events; the
history survives a clean restart and a C{kill -9} (nothing committed is
lost, the database is never corrupt).
"""

from __future__ import annotations

import json
import os
import re
import smtplib
import sqlite3
import subprocess

import pytest
from conftest import require_tool
from daemon import CLEAN_EXIT, DOMAIN, Daemon, message, send, wait_for
from historyharness import CONFIG, HttpDaemon, chromium_args, history_json, mailhub, make_token, refused


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = HttpDaemon(tmp_path_factory.mktemp("history"), CONFIG).start()
    yield d
    assert d.stop() == CLEAN_EXIT, d.stderr()
    assert "Traceback" not in d.log()


@pytest.fixture(scope="module")
def admin(daemon):
    return {"Authorization": f"Bearer {make_token(daemon, 'admin@' + DOMAIN)}"}


@pytest.fixture(scope="module")
def traffic(daemon):
    """Two messages delivered, two transactions refused (unknown user, relay denied)."""
    ids = [send(daemon, f"alice@{DOMAIN}", message(f"alice@{DOMAIN}", "h1")),
           send(daemon, f"bob@{DOMAIN}", message(f"bob@{DOMAIN}", "h2"))]
    assert refused(daemon, f"nobody@{DOMAIN}") == 550
    assert refused(daemon, "someone@elsewhere.test") == 554

    def recorded():
        found = history_json(daemon)
        sent = {m["queue_id"] for m in found if m["status"] == "sent"}
        rejected = [m for m in found if m["status"] == "rejected"]
        return found if sent == set(ids) and len(rejected) == 2 else None

    return ids, wait_for(recorded, 20, "the history to have every message")


def test_cli_lists_and_filters(daemon, traffic):
    ids, found = traffic
    by_id = {m["queue_id"]: m for m in found}
    assert by_id[ids[0]]["recipients"] == [{"address": f"alice@{DOMAIN}", "status": "sent"}]
    assert by_id[ids[0]]["sender"] == "sender@client.test" and by_id[ids[0]]["client"] == "127.0.0.1"
    assert [m["queue_id"] for m in history_json(daemon, "--to", f"bob@{DOMAIN}")] == [ids[1]]
    assert {m["queue_id"] for m in history_json(daemon, "--to", DOMAIN, "--status", "sent")} == set(ids)
    rejected = history_json(daemon, "--status", "rejected")
    assert sorted(r["recipients"][0]["address"] for r in rejected) == [f"nobody@{DOMAIN}", "someone@elsewhere.test"]
    assert history_json(daemon, "--from", "nobody@client.test") == []
    assert {m["queue_id"] for m in history_json(daemon, "--client", "127.0.0.1", "--since", "1h")} >= set(ids)
    r = mailhub(daemon, "history", ids[0])
    assert r.returncode == 0, r.stderr
    assert f"{ids[0]}: sent from=<sender@client.test>" in r.stdout
    assert re.search(r"\d{2}:\d{2}:\d{2}\.\d{3}Z accepted: " + ids[0] + ": accepted from=<sender@client.test>", r.stdout)
    assert re.search(r"delivery: " + ids[0] + f": to=<alice@{DOMAIN}>.*status=sent", r.stdout)
    r = mailhub(daemon, "history", "--status", "lost")
    assert r.returncode == 64 and r.stderr.startswith("mailhub: history: unknown status") and "Traceback" not in r.stderr


def test_api_agrees_with_the_cli(daemon, admin, traffic):
    ids, found = traffic
    status, _, body = daemon.request("GET", "/v1/messages?since=1h", headers=admin)
    assert status == 200, body
    api = json.loads(body)
    assert {(m["queue_id"], m["status"]) for m in api["messages"]} == {(m["queue_id"], m["status"]) for m in found}
    # paginated: one at a time, the cursor walks the same list
    walked, cursor = [], ""
    for _ in range(10):
        status, _, body = daemon.request("GET", "/v1/messages?limit=1" + (f"&cursor={cursor}" if cursor else ""),
                                         headers=admin)
        page = json.loads(body)
        walked += [m["queue_id"] for m in page["messages"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert walked == [m["queue_id"] for m in found]
    status, _, body = daemon.request("GET", f"/v1/messages?domain={DOMAIN}&status=sent", headers=admin)
    assert {m["queue_id"] for m in json.loads(body)["messages"]} == set(ids)
    status, _, body = daemon.request("GET", "/v1/messages?status=lost", headers=admin)
    assert status == 400 and json.loads(body)["error"].startswith("unknown status")
    # a message that left the queue: the same fields as a queued one, from the store
    status, _, body = daemon.request("GET", f"/v1/messages/{ids[0]}", headers=admin)
    assert status == 200, body
    one = json.loads(body)
    assert set(one) == {"queue_id", "state", "sender", "arrival", "next_attempt", "attempts", "size", "recipients",
                        "bounces", "delay_notices"}
    assert one["state"] == "done" and one["bounces"] == [] and one["sender"] == "sender@client.test"
    assert one["recipients"][0]["address"] == f"alice@{DOMAIN}" and one["recipients"][0]["state"] == "delivered"
    assert one["recipients"][0]["last_status"] == "2.0.0"


def test_stats_and_status_page_agree(daemon, admin, traffic):
    chromium = require_tool("chromium")
    status, _, body = daemon.request("GET", "/v1/stats?since=1h&bucket=minute", headers=admin)
    assert status == 200, body
    stats = json.loads(body)
    assert stats["totals"] == {"accepted": 2, "sent": 2, "deferred": 0, "bounced": 0, "rejected": 2}
    assert sum(b["sent"] for b in stats["buckets"]) == 2 and stats["bucket_seconds"] == 60
    assert stats["latency"]["count"] == 2 and stats["latency"]["p50"] is not None
    assert stats["top_domains"] == [{"name": DOMAIN, "count": 2}]
    assert {r["name"] for r in stats["top_rejected_clients"]} == {"127.0.0.1"}
    profile = str(daemon.home) + "/chromium"

    def dom(path: str) -> str:
        r = subprocess.run([chromium, *chromium_args(profile), "--dump-dom", f"http://127.0.0.1:{daemon.http_port}{path}"],
                           capture_output=True, timeout=60)
        return r.stdout.decode("utf-8", "replace")

    page = dom("/")
    for name, n in stats["totals"].items():
        assert f'id="history-{name}">{n}</div>' in page, name
    assert '<strong id="range-current">hour</strong>' in page and 'id="range-day" href="?range=day"' in page
    assert 'id="history-chart"' in page and page.count('class="bar"') >= 3
    assert f"<td>{DOMAIN}</td><td>2</td>" in page.split('id="top-domains"')[1].split("</table>")[0]
    # the range switch: the link's target draws a day in hours, then a week in days
    day = dom("/?range=day")
    assert '<strong id="range-current">day</strong>' in day and "-24 h" in day
    assert 'id="history-sent">2</div>' in day
    week = dom("/?range=week")
    assert '<strong id="range-current">week</strong>' in week and "-7 d" in week
    status, headers, _ = daemon.request("GET", "/?range=week")
    assert headers["Content-Security-Policy"].startswith("default-src 'none'")


def test_users_see_their_own_and_no_stats(daemon, admin, traffic):
    token = make_token(daemon, f"alice@{DOMAIN}")
    user = {"Authorization": f"Bearer {token}"}
    status, _, body = daemon.request("GET", "/v1/messages", headers=user)
    assert status == 200 and json.loads(body)["messages"] == []  # SMTP mail without AUTH is nobody's
    status, _, body = daemon.request("GET", "/v1/stats", headers=user)
    assert status == 403
    status, _, body = daemon.request("GET", f"/v1/messages/{traffic[0][0]}", headers=user)
    assert status == 404


def test_metrics_count_the_recorded_events(daemon, traffic):
    _, _, body = daemon.request("GET", "/metrics")
    m = re.search(rb"^mailhub_history_events_recorded_total ([0-9.e+]+)$", body, re.M)
    assert m and float(m.group(1)) >= 8
    assert re.search(rb"^mailhub_history_write_failures_total 0.0$", body, re.M)


def test_history_survives_restart_and_kill(tmp_path):
    d = Daemon(tmp_path, CONFIG.replace('http = ["tcp:0:interface=127.0.0.1"]\n', "")).start()
    first = send(d, f"alice@{DOMAIN}", message(f"alice@{DOMAIN}", "k1"))
    wait_for(lambda: any(m["queue_id"] == first and m["status"] == "sent" for m in history_json(d)), 20, "k1 recorded")
    assert d.stop() == CLEAN_EXIT
    d.start()
    assert [m["status"] for m in history_json(d) if m["queue_id"] == first] == ["sent"]
    second = send(d, f"bob@{DOMAIN}", message(f"bob@{DOMAIN}", "k2"))
    wait_for(lambda: any(m["queue_id"] == second for m in history_json(d)), 20, "k2 recorded")
    # mail keeps arriving while the process is killed in the middle of it
    with d.smtp() as s:
        s.ehlo()
        for i in range(5):
            s.sendmail("sender@client.test", [f"alice@{DOMAIN}"], message(f"alice@{DOMAIN}", f"k3-{i}"))
    d.kill()
    db = os.path.join(d.home, "history.sqlite")
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    d.start()
    found = {m["queue_id"]: m["status"] for m in history_json(d)}
    assert found[first] == "sent" and second in found
    # and recording goes on after the crash
    third = send(d, f"alice@{DOMAIN}", message(f"alice@{DOMAIN}", "k4"))
    wait_for(lambda: any(m["queue_id"] == third and m["status"] == "sent" for m in history_json(d)), 20, "k4 recorded")
    assert d.stop() == CLEAN_EXIT
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert "Traceback" not in d.log()


def test_a_broken_database_never_stops_mail(tmp_path):
    """The database is a directory: every write fails; mail is delivered, the failure logged once and counted."""
    os.makedirs(tmp_path / "history.sqlite")
    d = Daemon(tmp_path, CONFIG.replace('http = ["tcp:0:interface=127.0.0.1"]\n', "")).start()
    send(d, f"alice@{DOMAIN}", message(f"alice@{DOMAIN}", "b1"))
    wait_for(lambda: "history: cannot record events" in d.log(), 20, "the failure to be logged")
    from daemon import delivered_with

    delivered_with(d, "alice", "b1")
    send(d, f"alice@{DOMAIN}", message(f"alice@{DOMAIN}", "b2"))
    delivered_with(d, "alice", "b2")
    assert d.log().count("history: cannot record events") == 1
    # the directory goes away: recording resumes with what waited in memory
    os.rmdir(tmp_path / "history.sqlite")
    wait_for(lambda: "history: recording again" in d.log(), 20, "recording to resume")
    assert len([m for m in history_json(d) if m["status"] == "sent"]) == 2
    assert d.stop() == CLEAN_EXIT
    _ = smtplib  # smtplib: sessions above
