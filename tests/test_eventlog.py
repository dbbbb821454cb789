"""
The JSON event log and C{mailhub log ID}: real mail_event() calls through
the global log publisher into a file in tmp_path.
"""

from __future__ import annotations

import io
import json

import pytest
from twisted.logger import Logger, globalLogPublisher

from mailhub.cli.log import LogOptions, run_log
from mailhub.eventlog import EventLogObserver, event_record, story
from mailhub.maillog import mail_event

QID = "0DA3QZ5K8M1ABCDEF"
DSN = "0DA3QZ5K9M1GHJKLM"


@pytest.fixture
def log_path(tmp_path):
    path = str(tmp_path / "events.jsonl")
    obs = EventLogObserver(path)
    globalLogPublisher.addObserver(obs)
    yield path
    globalLogPublisher.removeObserver(obs)
    obs.close()


def lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def emit_story():
    mail_event("accepted", "{queue_id}: accepted from=<{sender}> nrcpt={nrcpt}", queue_id=QID,
               sender="alice@example.com", nrcpt=1, **{"from": "alice@example.com"})
    mail_event("accepted", "{queue_id}: accepted from=<{sender}>", queue_id="0DA3QZ5K8M1OTHER0", sender="x@y")
    mail_event("delivery", "{queue_id}: to=<{to}>, status={status} ({text})", queue_id=QID,
               to="bob@example.net", status="bounced", text="550 5.1.1 no such user")
    mail_event("bounce", "{queue_id}: {kind}: {dsn_id}", queue_id=QID, kind="sender non-delivery notification", dsn_id=DSN)
    mail_event("delivery", "{queue_id}: to=<{to}>, status={status} ({text})", queue_id=DSN,
               to="alice@example.com", status="sent", text="delivered")
    mail_event("removed", "{queue_id}: removed", queue_id=QID)
    mail_event("removed", "{queue_id}: removed", queue_id=DSN)


def test_one_json_line_per_mail_event(log_path):
    Logger().info("not a mail event {x}", x=1)
    mail_event("accepted", "{queue_id}: accepted from=<{sender}> size={size}", queue_id=QID,
               sender="ålice@example.com", size=12, **{"from": "ålice@example.com"})
    mail_event("reject", "NOQUEUE: reject: {code} {enhanced}", code=554, enhanced="5.7.1", rcpt=b"bytes\xff")
    got = lines(log_path)
    assert len(got) == 2
    first = got[0]
    assert set(first) == {"time", "event", "queue_id", "text", "sender", "size", "from"}
    assert first["event"] == "accepted" and first["queue_id"] == QID and first["size"] == 12
    assert first["text"] == f"{QID}: accepted from=<ålice@example.com> size=12"
    assert isinstance(first["time"], float)
    assert got[1]["queue_id"] == "-" and got[1]["rcpt"] == "bytes\ufffd" and got[1]["text"] == "NOQUEUE: reject: 554 5.7.1"
    with open(log_path, "rb") as f:
        assert "ålice".encode() in f.read()  # UTF-8, not \u escapes


def test_written_line_by_line(tmp_path):
    path = str(tmp_path / "e.jsonl")
    obs = EventLogObserver(path)
    obs({"mail_event": "hold", "queue_id": QID, "log_format": "{queue_id}: held", "log_time": 1.0})
    with open(path) as f:  # visible before close: flushed per line
        assert json.loads(f.read()) == {"event": "hold", "queue_id": QID, "text": f"{QID}: held", "time": 1.0}
    obs.close()


def test_non_json_values_become_text():
    rec = event_record({"mail_event": "x", "log_format": "{o}", "o": object(), "t": (1, 2), "log_time": 2.0})
    assert rec["t"] == [1, 2] and rec["o"].startswith("<object object")
    assert event_record({"log_format": "plain"}) is None


def test_write_errors_do_not_raise(capsys):
    stream = io.StringIO()
    obs = EventLogObserver(stream=stream)
    stream.close()
    obs({"mail_event": "hold", "queue_id": QID, "log_format": "x"})
    obs({"mail_event": "hold", "queue_id": QID, "log_format": "x"})
    assert capsys.readouterr().err.count("event log") == 1


def test_story_follows_the_bounce(log_path):
    emit_story()
    with open(log_path, "a") as f:
        f.write('{"torn line\n\n[1,2]\n')
    got = story(log_path, QID)
    assert [(r["event"], r["queue_id"]) for r in got] == [
        ("accepted", QID), ("delivery", QID), ("bounce", QID), ("delivery", DSN), ("removed", QID), ("removed", DSN),
    ]
    assert story(log_path, "NOSUCHID00") == []
    assert story(log_path + ".missing", QID) == []


def test_run_log(log_path):
    emit_story()
    out, err = io.StringIO(), io.StringIO()
    opts = LogOptions()
    opts.parseOptions([QID])
    assert run_log(opts, log_path, out, err) == 0
    text = out.getvalue().splitlines()
    assert len(text) == 6
    assert text[0].endswith(f"Z {QID}: accepted from=<alice@example.com> nrcpt=1")
    assert text[2].endswith(f"{QID}: sender non-delivery notification: {DSN}")
    assert text[3].endswith(f"{DSN}: to=<alice@example.com>, status=sent (delivered)")
    opts = LogOptions()
    opts.parseOptions(["--json", "--file", log_path, QID])
    out = io.StringIO()
    assert run_log(opts, None, out, err) == 0
    assert [json.loads(x)["event"] for x in out.getvalue().splitlines()][:2] == ["accepted", "delivery"]
    opts = LogOptions()
    opts.parseOptions(["NOSUCHID00"])
    err = io.StringIO()
    assert run_log(opts, log_path, io.StringIO(), err) == 1
    assert err.getvalue() == f"mailhub: no events for NOSUCHID00 in {log_path}\n"
    assert run_log(opts, None, io.StringIO(), err) == 64


def test_created_not_world_readable(tmp_path):
    import os
    import stat

    path = str(tmp_path / "events.log")
    old = os.umask(0o022)
    try:
        EventLogObserver(path).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_existing_file_keeps_its_mode(tmp_path):
    import os
    import stat

    path = tmp_path / "events.log"
    path.write_text("")
    os.chmod(path, 0o600)
    obs = EventLogObserver(str(path))
    obs.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_an_events_own_text_is_kept_as_detail():
    record = event_record({"mail_event": "delivery", "log_format": "{queue_id}: to=<{to}> ({text})",
                           "queue_id": QID, "to": "b@example.org", "text": "250 2.0.0 Ok: queued as X", "log_time": 1.0})
    assert record["detail"] == "250 2.0.0 Ok: queued as X"
    assert record["text"] == f"{QID}: to=<b@example.org> (250 2.0.0 Ok: queued as X)"


def test_rotation_by_size_keeps_a_bounded_number_of_files_and_story_reads_them(tmp_path):
    path = str(tmp_path / "events.jsonl")
    obs = EventLogObserver(path, max_size=2000, keep=2)
    try:
        def event(qid, n):
            obs({"mail_event": "delivery", "log_format": "{queue_id}: n={n}", "queue_id": qid, "n": n, "log_time": float(n)})

        event(QID, 0)
        for n in range(1, 80):
            event("0DA3QZ5K8M1OTHER0", n)
        event(QID, 80)
    finally:
        obs.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]
    assert all((tmp_path / n).stat().st_size <= 2000 for n in names)
    # the oldest file went away with its events; what is left reads in order
    ns = [r["n"] for r in story(path, "0DA3QZ5K8M1OTHER0")]
    assert ns == sorted(ns) and ns[-1] == 79 and ns[0] > 1
    assert [r["n"] for r in story(path, QID)] == [80]


def test_rotation_spans_files_for_one_message(tmp_path):
    path = str(tmp_path / "events.jsonl")
    obs = EventLogObserver(path, max_size=300, keep=5)
    try:
        for n in range(6):
            obs({"mail_event": "delivery", "log_format": "{queue_id}: n={n}", "queue_id": QID, "n": n, "log_time": float(n)})
    finally:
        obs.close()
    assert len(list(tmp_path.iterdir())) > 2
    assert [r["n"] for r in story(path, QID)] == list(range(6))


def test_no_rotation_without_max_size(tmp_path):
    path = str(tmp_path / "events.jsonl")
    obs = EventLogObserver(path)
    try:
        for n in range(50):
            obs({"mail_event": "delivery", "log_format": "x", "queue_id": QID, "n": n, "log_time": 1.0})
    finally:
        obs.close()
    assert [p.name for p in tmp_path.iterdir()] == ["events.jsonl"]


def test_text_is_the_mail_events_own_line_braces_and_all(log_path):
    # the event carries its finished line; the record's text is that line,
    # exactly what twisted.logger's formatEvent makes of the event
    from twisted.logger import formatEvent

    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        mail_event("reject", "NOQUEUE: reject: RCPT from [{client}]: {text}; to=<{to}>",
                   client="192.0.2.1", text="550 {not a field} }{", to="a{b}@example.com")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    [record] = lines(log_path)
    expected = "NOQUEUE: reject: RCPT from [192.0.2.1]: 550 {not a field} }{; to=<a{b}@example.com>"
    assert record["text"] == expected == formatEvent(seen[0])
    assert record["detail"] == "550 {not a field} }{"
    # an event from elsewhere (no finished line) is still formatted
    assert event_record({"mail_event": "x", "log_format": "{a}-{b}", "a": 1, "b": "z"})["text"] == "1-z"


def test_one_write_per_line_on_an_append_descriptor(tmp_path, monkeypatch):
    import os

    path = str(tmp_path / "e.jsonl")
    obs = EventLogObserver(path)
    writes = []
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(data) or real(fd, data))
    obs({"mail_event": "hold", "queue_id": QID, "log_format": "{queue_id}: held", "log_time": 1.0, "who": "ålice"})
    obs.close()
    assert len(writes) == 1 and writes[0].endswith(b"\n") and "ålice".encode() in writes[0]
    assert lines(path)[0]["who"] == "ålice"
