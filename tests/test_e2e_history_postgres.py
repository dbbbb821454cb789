"""
End-to-end: two real mailhub daemons share one history on a real
PostgreSQL server that the test starts (initdb into a temporary directory,
127.0.0.1, a free port; as C{nobody} when the tests run as root).  Mail
through either daemon is in the one history; C{mailhub history}, the HTTP
API and the status page (headless Chromium) agree on it; it survives a
restart and a C{kill -9} of a daemon.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import require_tool
from daemon import CLEAN_EXIT, DOMAIN, message, send, wait_for
from historyharness import CONFIG, HttpDaemon, chromium_args, history_json, mailhub, make_token, refused
from pgcluster import PostgresCluster


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("psycopg")
    c = PostgresCluster().start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def daemons(cluster, tmp_path_factory):
    out = []
    for n in (1, 2):
        text = CONFIG.replace(f'hostname = "mx.{DOMAIN}"', f'hostname = "mx{n}.{DOMAIN}"').replace(
            'database = "history.sqlite"', f'database = "{cluster.url}"'
        )
        out.append(HttpDaemon(tmp_path_factory.mktemp(f"pg{n}"), text).start())
    yield out
    for d in out:
        assert d.stop() == CLEAN_EXIT, d.stderr()
        assert "Traceback" not in d.log()


def test_two_daemons_share_one_history(cluster, daemons):
    chromium = require_tool("chromium")
    one, two = daemons
    ids = {
        send(one, f"alice@{DOMAIN}", message(f"alice@{DOMAIN}", "p1")): "mx1",
        send(two, f"bob@{DOMAIN}", message(f"bob@{DOMAIN}", "p2")): "mx2",
        send(two, f"alice@{DOMAIN}", message(f"alice@{DOMAIN}", "p3")): "mx2",
    }
    assert refused(one, "someone@elsewhere.test") == 554

    def everything():
        found = history_json(one)
        sent = {m["queue_id"]: m["node"] for m in found if m["status"] == "sent"}
        return found if len(sent) == 3 and any(m["status"] == "rejected" for m in found) else None

    found = wait_for(everything, 30, "both daemons' mail in the history")
    assert {m["queue_id"]: m["node"].split(".")[0] for m in found if m["status"] == "sent"} == ids
    # the other daemon's configuration reads the same history
    assert {(m["queue_id"], m["status"]) for m in history_json(two)} == {(m["queue_id"], m["status"]) for m in found}
    r = mailhub(two, "history", next(q for q, node in ids.items() if node == "mx1"))
    assert r.returncode == 0 and ": sent from=<sender@client.test>" in r.stdout, r.stderr
    # HTTP on daemon 1 lists daemon 2's mail too, and the statistics count both
    admin = {"Authorization": f"Bearer {make_token(one, 'admin@' + DOMAIN)}"}
    status, _, body = one.request("GET", "/v1/messages", headers=admin)
    assert status == 200
    assert {(m["queue_id"], m["status"]) for m in json.loads(body)["messages"]} == {
        (m["queue_id"], m["status"]) for m in found
    }
    status, _, body = one.request("GET", f"/v1/messages/{next(q for q, n in ids.items() if n == 'mx2')}", headers=admin)
    assert status == 200 and json.loads(body)["recipients"][0]["state"] == "delivered"
    status, _, body = one.request("GET", "/v1/stats?since=1h&bucket=minute", headers=admin)
    totals = json.loads(body)["totals"]
    assert totals == {"accepted": 3, "sent": 3, "deferred": 0, "bounced": 0, "rejected": 1}
    # the status page of daemon 2 draws the same numbers
    page = subprocess.run(
        [chromium, *chromium_args(str(two.home) + "/chromium"), "--dump-dom", f"http://127.0.0.1:{two.http_port}/"],
        capture_output=True, timeout=60,
    ).stdout.decode("utf-8", "replace")
    for name, n in totals.items():
        assert f'id="history-{name}">{n}</div>' in page, name


def test_history_survives_restart_and_kill(cluster, daemons):
    one, two = daemons
    before = {m["queue_id"] for m in history_json(one)}
    qid = send(one, f"alice@{DOMAIN}", message(f"alice@{DOMAIN}", "p4"))
    wait_for(lambda: any(m["queue_id"] == qid and m["status"] == "sent" for m in history_json(two)), 30, "p4")
    one.kill()
    one.start()
    after = {m["queue_id"]: m["status"] for m in history_json(two)}
    assert before | {qid} <= set(after) and after[qid] == "sent"
    assert two.stop() == CLEAN_EXIT
    two.start()
    qid2 = send(two, f"bob@{DOMAIN}", message(f"bob@{DOMAIN}", "p5"))
    wait_for(lambda: any(m["queue_id"] == qid2 and m["status"] == "sent" for m in history_json(one)), 30, "p5")
    with __import__("psycopg").connect(cluster.url) as conn:
        counts = conn.execute("SELECT COUNT(*) FROM messages WHERE status = 'sent'").fetchone()
    assert counts[0] == len([m for m in history_json(one) if m["status"] == "sent"])
