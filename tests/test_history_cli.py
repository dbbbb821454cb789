"""
C{mailhub history}: the list, the filters, one message's story, and clear
one-line errors (never a traceback) with their exit statuses.
"""

from __future__ import annotations

import io
import json

import pytest

from mailhub.cli.main import main
from mailhub.history.store import SQLiteStore, rows_of

T0 = 1_800_000_000.0


@pytest.fixture
def db(tmp_path):
    path = str(tmp_path / "history.sqlite")
    store = SQLiteStore(path)
    store.write(rows_of([
        {"mail_event": "accepted", "queue_id": "QA", "from": "a@x.test", "client": "192.0.2.1", "rcpts": ["b@y.test"],
         "log_time": T0, "log_mail_text": "QA: accepted from=<a@x.test>"},
        {"mail_event": "delivery", "queue_id": "QA", "to": "b@y.test", "status": "sent", "dsn": "2.0.0", "code": 250,
         "text": "delivered", "log_time": T0 + 1, "log_mail_text": "QA: to=<b@y.test>, status=sent (delivered)"},
        {"mail_event": "accepted", "queue_id": "QB", "from": "c@x.test", "client": "192.0.2.2", "rcpts": ["d@z.test"],
         "log_time": T0 + 10, "log_mail_text": "QB: accepted from=<c@x.test>"},
        {"mail_event": "delivery", "queue_id": "QB", "to": "d@z.test", "status": "bounced", "dsn": "5.1.1", "code": 550,
         "text": "no such user\x1b[31m", "log_time": T0 + 11, "log_mail_text": "QB: to=<d@z.test>, status=bounced"},
        {"mail_event": "bounce", "queue_id": "QB", "kind": "sender non-delivery notification", "dsn_id": "QD",
         "log_time": T0 + 11, "log_mail_text": "QB: sender non-delivery notification: QD"},
        {"mail_event": "delivery", "queue_id": "QD", "to": "c@x.test", "status": "sent", "log_time": T0 + 12,
         "log_mail_text": "QD: to=<c@x.test>, status=sent"},
    ]))
    store.close()
    return path


def run(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(["history", *args], out, err)
    return status, out.getvalue(), err.getvalue()


def test_list_newest_first_one_line_each(db):
    status, out, err = run("--database", db)
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert [line.split()[1] for line in lines] == ["QD", "QB", "QA"]
    assert lines[2] == "2027-01-15T08:00:00Z QA sent     from=<a@x.test> to=b@y.test client=192.0.2.1"


@pytest.mark.parametrize("args, ids", [
    (["--to", "z.test"], ["QB"]),
    (["--to", "B@Y.test"], ["QA"]),
    (["--from", "c@x.test"], ["QB"]),
    (["--status", "bounced"], ["QB"]),
    (["--client", "192.0.2.1"], ["QA"]),
    (["--since", "1800000005", "--until", "1800000011"], ["QB"]),
    (["--limit", "1"], ["QD"]),
])
def test_filters(db, args, ids):
    status, out, _ = run("--database", db, "--json", *args)
    assert status == 0 and [json.loads(line)["queue_id"] for line in out.splitlines()] == ids


def test_story_follows_the_bounce_and_escapes_control_characters(db):
    status, out, _ = run("--database", db, "QB")
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == "QB: bounced from=<c@x.test> client=192.0.2.2"
    assert lines[1] == "  to=<d@z.test> bounced 5.1.1 no such user?[31m"
    assert lines[2:] == [
        "2027-01-15T08:00:10.000Z accepted: QB: accepted from=<c@x.test>",
        "2027-01-15T08:00:11.000Z delivery: QB: to=<d@z.test>, status=bounced",
        "2027-01-15T08:00:11.000Z bounce: QB: sender non-delivery notification: QD",
        "2027-01-15T08:00:12.000Z delivery: QD: to=<c@x.test>, status=sent",
    ]
    status, out, _ = run("--database", db, "--json", "QB")
    data = json.loads(out)
    assert data["message"]["status"] == "bounced" and [e["queue_id"] for e in data["events"]] == ["QB", "QB", "QB", "QD"]


@pytest.mark.parametrize("args, code, error", [
    (["--status", "lost"], 64, "mailhub: history: unknown status 'lost'"),
    (["--since", "yesterday"], 64, "mailhub: history: not a time"),
    (["NOSUCH"], 1, "mailhub: history: no message NOSUCH"),
    (["--from", "nobody@x.test"], 1, "mailhub: history: no message matches"),
])
def test_errors_are_one_line(db, args, code, error):
    status, out, err = run("--database", db, *args)
    assert status == code and err.startswith(error) and err.count("\n") == 1 and out == ""


def test_a_missing_or_broken_database_is_one_line(tmp_path):
    status, _, err = run("--database", str(tmp_path / "none.sqlite"))
    assert status == 69 and err == f"mailhub: history database {tmp_path / 'none.sqlite'}: no such file\n"
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    status, _, err = run("--database", str(bad))
    assert status == 69 and err.startswith("mailhub: history database") and "Traceback" not in err
    status, _, err = run("--database", str(bad), "--limit", "0")
    assert status == 64 and "--limit must be 1 to 1000" in err


def test_the_database_from_the_configuration(tmp_path, db):
    conf = tmp_path / "mailhub.toml"
    conf.write_text(f'[history]\ndatabase = "{db}"\n')
    status, out, _ = main_with_config(str(conf))
    assert status == 0 and len(out.splitlines()) == 3
    conf.write_text('[history]\nenabled = false\n')
    status, _, err = main_with_config(str(conf))
    assert status == 64 and "history.enabled is false" in err


def main_with_config(conf: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    return main(["--config", conf, "history"], out, err), out.getvalue(), err.getvalue()
