"""
The mail log: mail events through L{mailhub.maillog.mail_publisher}, the
default forwarding to the global publisher, and the mail log file of
mailhub's own (C{server.mail_log}: L{MailLogFile}, L{MailLogService}).

Unit tests drive a L{Clock} for rotation checks; the line format is
compared byte for byte with what twistd's text observer writes for the
same event.  The last test runs the real daemon with C{mail_log} set.
"""

from __future__ import annotations

import os
import re
import stat
import time

import pytest
from twisted.internet.task import Clock
from twisted.logger import (
    Logger,
    LogLevel,
    LogPublisher,
    formatEvent,
    formatEventAsClassicLogText,
    globalLogPublisher,
)

from mailhub import maillog
from mailhub.eventlog import EventLogObserver, event_record
from mailhub.maillog import CHECK_INTERVAL, MailLogFile, MailLogService, mail_event, mail_publisher
from mailhub.metrics import MailMetrics, MetricsObserver

QID = "4Q0B2X7Z9A8C"
#: 2026-11-28T17:26:46Z
WHEN = 1795886806.25


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    """twistd stamps local time: make it UTC so the expected lines are exact."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture(autouse=True)
def publisher_restored():
    """Every test leaves the mail publisher as it found it: forwarding only."""
    before = list(mail_publisher._observers)
    yield
    assert mail_publisher._observers == before == [globalLogPublisher]


@pytest.fixture
def captured():
    """Mail events as they leave mail_event(), with log_time pinned to WHEN."""
    seen: list[dict] = []

    def observe(event: dict) -> None:
        event["log_time"] = WHEN
        seen.append(event)

    mail_publisher.addObserver(observe)
    yield seen
    mail_publisher.removeObserver(observe)


@pytest.fixture
def global_events():
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def emit(captured, event: str, format: str, **fields) -> dict:
    mail_event(event, format, **fields)
    return captured[-1]


def read(path) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8")


@pytest.fixture
def mail_log(tmp_path):
    clock = Clock()
    clock.advance(1000)
    f = MailLogFile(str(tmp_path / "mail.log"), clock)
    yield f
    f.close()


# -- the line ---------------------------------------------------------------------------------


def test_line_format_exact(captured, mail_log):
    event = emit(captured, "accepted", "{queue_id}: accepted from=<{sender}> nrcpt={nrcpt}",
                 queue_id=QID, sender="alice@example.test", nrcpt=2)
    mail_log(event)
    expected = f"2026-11-28T17:26:46+0000 [mailhub.mail#info] {QID}: accepted from=<alice@example.test> nrcpt=2\n"
    assert read(mail_log.path) == expected
    # the same text twistd's own text observer writes for this event
    assert formatEventAsClassicLogText(event) == expected


def test_event_is_what_logger_info_would_emit(captured):
    """mail_event builds the event itself (no Logger.emit): same keys, same bookkeeping values."""
    ours = emit(captured, "accepted", "{queue_id}: accepted from=<{sender}>", queue_id=QID, sender="a@b.test")
    maillog.maillog.info("{queue_id}: accepted from=<{sender}>", queue_id=QID, sender="a@b.test", mail_event="accepted")
    theirs = captured[-1]
    assert set(ours) - {"log_mail_text"} == set(theirs)
    for key in ("log_logger", "log_level", "log_namespace", "log_source", "mail_event", "queue_id", "sender"):
        assert ours[key] == theirs[key], key
    assert formatEvent(ours) == formatEvent(theirs)


def test_braces_are_single_in_the_file(captured, mail_log):
    event = emit(captured, "delivery", "{queue_id}: to=<{to}>, status=bounced ({text})",
                 queue_id=QID, to="a@example.test", text="550 5.1.1 no {such} user }{ {{x}}")
    assert event["log_format"].count("{{such}}") == 1  # doubled for twisted.logger
    mail_log(event)
    line = read(mail_log.path)
    assert line == (
        f"2026-11-28T17:26:46+0000 [mailhub.mail#info] {QID}: to=<a@example.test>, "
        "status=bounced (550 5.1.1 no {such} user }{ {{x}})\n"
    )
    assert line == formatEventAsClassicLogText(event)


def test_unicode_is_utf8(captured, mail_log):
    event = emit(captured, "accepted", "{queue_id}: accepted from=<{sender}>", queue_id=QID,
                 sender="jörg@bücher.example 📬")
    mail_log(event)
    with open(mail_log.path, "rb") as f:
        raw = f.read()
    assert raw == (
        f"2026-11-28T17:26:46+0000 [mailhub.mail#info] {QID}: accepted from=<jörg@bücher.example 📬>\n"
    ).encode()
    # a lone surrogate (undecodable bytes passed along) never stops the line
    event = emit(captured, "accepted", "{queue_id}: from=<{sender}>", queue_id=QID, sender="x\udcff")
    mail_log(event)
    assert read(mail_log.path).endswith(f"{QID}: from=<x\\udcff>\n")


def test_multiline_text_is_indented_like_twistd(captured, mail_log):
    event = emit(captured, "delivery", "{queue_id}: status=deferred ({text})", queue_id=QID,
                 text="451-first\n451 second")
    mail_log(event)
    assert read(mail_log.path) == formatEventAsClassicLogText(event)
    assert read(mail_log.path).endswith("(451-first\n\t451 second)\n")


def test_time_is_formatted_once_per_second(captured, mail_log, monkeypatch):
    calls = []
    real = maillog.formatTime
    monkeypatch.setattr(maillog, "formatTime", lambda when: calls.append(when) or real(when))
    event = emit(captured, "removed", "{queue_id}: removed", queue_id=QID)
    for when in (WHEN, WHEN + 0.5, WHEN + 0.74, WHEN + 1, WHEN + 1.7):
        mail_log(dict(event, log_time=when))
    assert calls == [1795886806, 1795886807]
    assert read(mail_log.path) == (
        f"2026-11-28T17:26:46+0000 [mailhub.mail#info] {QID}: removed\n" * 3
        + f"2026-11-28T17:26:47+0000 [mailhub.mail#info] {QID}: removed\n" * 2
    )


def test_other_events_are_formatted_by_twisted(mail_log):
    # a bad template (mail_event lets twisted.logger report it), a failure, a log_system
    events = [
        dict(log_format="{queue_id}: oops {missing}", queue_id=QID, mail_event="x", log_time=WHEN,
             log_namespace="mailhub.mail", log_level=LogLevel.info),
        dict(log_format="plain {a}", a="b", log_time=WHEN, log_system="sys", log_level=LogLevel.warn),
        dict(log_time=WHEN),  # no text: no line, as twistd
    ]
    for event in events:
        mail_log(event)
    assert read(mail_log.path) == "".join(formatEventAsClassicLogText(e) or "" for e in events)
    assert "2026-11-28T17:26:46+0000 [sys] plain b\n" in read(mail_log.path)


def test_bad_template_is_still_reported(captured):
    event = emit(captured, "accepted", "{queue_id}: accepted {missing}", queue_id=QID)
    assert "log_mail_text" not in event
    assert event["log_format"] == "{queue_id}: accepted {missing}"


def test_mail_text_stays_out_of_the_event_log(captured):
    event = emit(captured, "accepted", "{queue_id}: accepted {{x}}", queue_id=QID)
    record = event_record(event)
    assert record["text"] == f"{QID}: accepted {{x}}"
    assert not any(key.startswith("log_") for key in record)


# -- where mail events go -------------------------------------------------------------------------


def test_default_forwards_to_the_global_publisher(global_events):
    mail_event("accepted", "{queue_id}: accepted", queue_id=QID, listener="smtp")
    Logger(namespace="mailhub.other").info("not a mail event")
    mail = [e for e in global_events if "mail_event" in e]
    assert [(e["mail_event"], e["log_namespace"], e["log_format"]) for e in mail] == [
        ("accepted", "mailhub.mail", f"{QID}: accepted")
    ]
    assert len(global_events) == 2


def test_file_takes_the_place_of_forwarding(tmp_path, global_events):
    f = MailLogFile(str(tmp_path / "mail.log"), Clock())
    svc = MailLogService(f)
    svc.startService()
    try:
        assert globalLogPublisher not in mail_publisher._observers
        mail_event("accepted", "{queue_id}: accepted", queue_id=QID)
        Logger(namespace="mailhub.tap").info("a startup line")
    finally:
        svc.stopService()
    # after stop: forwarding is back, the file is closed
    mail_event("removed", "{queue_id}: removed", queue_id=QID)
    assert f._fd is None
    text = read(tmp_path / "mail.log")
    assert re.fullmatch(r"\S+ \[mailhub\.mail#info\] " + QID + r": accepted\n", text), text
    # twistd's log (the global publisher) had the non-mail line and the one after stop
    assert [e.get("mail_event") for e in global_events] == [None, "removed"]


def test_metrics_and_event_log_still_see_every_mail_event(tmp_path, global_events):
    from mailhub import tap

    metrics = MailMetrics(Clock())
    events_path = str(tmp_path / "events.jsonl")
    event_log = EventLogObserver(events_path)
    services = [
        tap._Observer(MetricsObserver(metrics)),
        tap._Observer(event_log, event_log.close),
        MailLogService(MailLogFile(str(tmp_path / "mail.log"), Clock())),
    ]
    for s in services:
        s.startService()
    try:
        mail_event("accepted", "{queue_id}: accepted", queue_id=QID, listener="smtp")
        mail_event("delivery", "{queue_id}: to=<{to}>, status={status}", queue_id=QID, to="a@b.test",
                   status="sent", relay="local", delay=0.5)
    finally:
        for s in reversed(services):
            s.stopService()
    assert metrics.accepted.labels(listener="smtp")._value.get() == 1
    assert metrics.deliveries.labels(status="sent", transport="local")._value.get() == 1
    assert '"event": "delivery"' in read(events_path)
    assert read(tmp_path / "mail.log").count(QID) == 2
    assert [e for e in global_events if "mail_event" in e] == []


def test_service_with_a_publisher_of_its_own(tmp_path):
    # MailLogService works on any publisher (the forwarding it removes is globalLogPublisher)
    pub = LogPublisher()
    pub.addObserver(globalLogPublisher)
    svc = MailLogService(MailLogFile(str(tmp_path / "m.log"), Clock()), pub)
    svc.startService()
    assert pub._observers == [svc.observer]
    svc.stopService()
    assert pub._observers == [globalLogPublisher]


# -- the file -------------------------------------------------------------------------------------


def test_file_is_created_0640_and_appended(tmp_path):
    path = tmp_path / "mail.log"
    path.write_text("old line\n")
    os.chmod(path, 0o600)
    f = MailLogFile(str(path), Clock())
    f(dict(log_format="new", log_time=WHEN, log_namespace="n", log_level=LogLevel.info, log_mail_text="new"))
    f.close()
    assert read(path) == "old line\n2026-11-28T17:26:46+0000 [n#info] new\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # an existing file keeps its mode
    old = os.umask(0o022)
    try:
        MailLogFile(str(tmp_path / "new.log"), Clock()).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "new.log").st_mode) == 0o640


def test_cannot_open_raises_at_start(tmp_path):
    with pytest.raises(FileNotFoundError):
        MailLogFile(str(tmp_path / "no" / "mail.log"), Clock())


def line_event(text: str) -> dict:
    return dict(log_format=text, log_mail_text=text, log_time=WHEN, log_namespace="mailhub.mail",
                log_level=LogLevel.info, mail_event="x")


def test_rotation_by_rename_reopens_after_a_clock_second(tmp_path):
    clock = Clock()
    path = tmp_path / "mail.log"
    f = MailLogFile(str(path), clock)
    f(line_event("one"))
    os.rename(path, tmp_path / "mail.log.1")  # logrotate without copytruncate
    clock.advance(CHECK_INTERVAL - 0.01)
    f(line_event("two"))  # not checked yet: the old (renamed) file
    assert not path.exists()
    clock.advance(0.01)
    f(line_event("three"))
    f(line_event("four"))
    f.close()
    assert [l.split("] ")[1] for l in read(tmp_path / "mail.log.1").splitlines()] == ["one", "two"]
    assert [l.split("] ")[1] for l in read(path).splitlines()] == ["three", "four"]


def test_rotation_by_removal_and_stat_at_most_once_per_second(tmp_path, monkeypatch):
    clock = Clock()
    path = tmp_path / "mail.log"
    f = MailLogFile(str(path), clock)
    stats = []
    real_stat = os.stat
    monkeypatch.setattr(maillog.os, "stat", lambda p, *a, **k: stats.append(p) or real_stat(p, *a, **k))
    for _ in range(5):
        f(line_event("same second"))
        clock.advance(0.1)
    assert stats == []
    clock.advance(0.5)
    os.unlink(path)
    f(line_event("after removal"))
    f(line_event("again"))
    assert stats == [str(path)]
    f.close()
    assert [l.split("] ")[1] for l in read(path).splitlines()] == ["after removal", "again"]


def test_write_error_does_not_raise_and_is_said_once(tmp_path, capsys):
    clock = Clock()
    path = tmp_path / "mail.log"
    f = MailLogFile(str(path), clock)
    good = f._fd
    f._fd = os.open(os.devnull, os.O_RDONLY)  # every write fails with EBADF
    os.close(good)
    f(line_event("lost 1"))
    f(line_event("lost 2"))
    err = capsys.readouterr().err
    assert err == f"mailhub: mail log {path}: Bad file descriptor\n"
    clock.advance(CHECK_INTERVAL)
    f(line_event("back"))  # the check after a failure reopens the path
    f.close()
    assert [l.split("] ")[1] for l in read(path).splitlines()] == ["back"]
    assert capsys.readouterr().err == ""


def test_write_error_through_mail_event_never_reaches_the_emitter(tmp_path, capsys, global_events):
    f = MailLogFile(str(tmp_path / "mail.log"), Clock())
    svc = MailLogService(f)
    svc.startService()
    try:
        os.close(f._fd)
        f._fd = os.open(os.devnull, os.O_RDONLY)
        mail_event("accepted", "{queue_id}: accepted", queue_id=QID)  # does not raise
        mail_event("accepted", "{queue_id}: accepted", queue_id=QID)
        # the observer was not disabled by the publisher (no "Temporarily disabling observer")
        assert f in mail_publisher._observers
    finally:
        svc.stopService()
    assert capsys.readouterr().err.count("mailhub: mail log") == 1
    assert [e for e in global_events if "log_failure" in e] == []


def test_reopen_failure_is_said_once_and_retried(tmp_path, capsys):
    clock = Clock()
    logs = tmp_path / "logs"
    logs.mkdir()
    path = logs / "mail.log"
    f = MailLogFile(str(path), clock)
    os.rename(path, tmp_path / "rotated.log")
    os.rename(logs, tmp_path / "logs.gone")
    clock.advance(1)
    f(line_event("to the old file"))  # the path cannot be reopened: keep the open file
    clock.advance(1)
    f(line_event("still old"))
    assert capsys.readouterr().err == (
        f"mailhub: mail log {path}: cannot reopen: No such file or directory\n"
    )
    logs.mkdir()
    clock.advance(1)
    f(line_event("new file"))
    f.close()
    assert [l.split("] ")[1] for l in read(tmp_path / "rotated.log").splitlines()] == [
        "to the old file", "still old"
    ]
    assert [l.split("] ")[1] for l in read(path).splitlines()] == ["new file"]


# -- configuration and wiring ---------------------------------------------------------------------


def write_conf(tmp_path, text: str):
    conf = tmp_path / "m.toml"
    conf.write_text(f'data_dir = "{tmp_path}/data"\n' + text)
    return conf


def test_config_key(tmp_path):
    from mailhub.config import load_config

    c = load_config(write_conf(tmp_path, '[server]\nmail_log = "mail.log"\n'), check_files=True)
    assert c.server.mail_log == str(tmp_path / "mail.log")
    assert load_config(write_conf(tmp_path, '[server]\nmail_log = ""\n')).server.mail_log is None
    assert load_config(write_conf(tmp_path, "")).server.mail_log is None


@pytest.mark.parametrize("value, problem", [
    ("1", "must be a string, got 1"),
    ('"nodir/mail.log"', "no such directory {tmp}/nodir"),
    ('"adir"', "not a regular file {tmp}/adir"),
])
def test_config_errors(tmp_path, value, problem):
    from mailhub.config import ConfigError, load_config

    (tmp_path / "adir").mkdir()
    conf = write_conf(tmp_path, f"[server]\nmail_log = {value}\n")
    with pytest.raises(ConfigError) as e:
        load_config(conf, check_files=True)
    assert str(e.value) == f"{conf}: server.mail_log: {problem.format(tmp=tmp_path)}"


def test_make_service_wires_the_mail_log(tmp_path, monkeypatch, global_events):
    from mailhub import tap

    monkeypatch.chdir(tmp_path)
    conf = write_conf(tmp_path, '[server]\nsmtp = ["tcp:0:interface=127.0.0.1"]\nmail_log = "mail.log"\n')
    top = tap.makeService({"config": str(conf), "user": "root" if os.geteuid() == 0 else None})
    children = list(top)
    services = [c for c in children if isinstance(c, MailLogService)]
    assert len(services) == 1
    assert services[0].observer.path == str(tmp_path / "mail.log")
    # started before the scheduler (recovery logs mail events), so stopped after it
    assert children.index(services[0]) < children.index(top.getServiceNamed("scheduler"))
    startup = next(c for c in children if isinstance(c, tap._StartupLog))
    startup.privilegedStartService()
    texts = [e["log_format"].format(**e) for e in global_events if e.get("log_namespace") == "mailhub.tap"]
    assert f"mail log: {tmp_path / 'mail.log'}" in texts
    services[0].observer.close()


def test_make_service_cannot_open_mail_log(tmp_path, monkeypatch, capsys):
    from mailhub import tap

    def refuse(path, clock=None):
        raise PermissionError(13, "Permission denied")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(maillog, "MailLogFile", refuse)
    conf = write_conf(tmp_path, '[server]\nmail_log = "mail.log"\n')
    with pytest.raises(SystemExit) as e:
        tap.makeService({"config": str(conf), "user": "root" if os.geteuid() == 0 else None})
    assert e.value.code == 78
    assert capsys.readouterr().err == (
        f"mailhub: {conf}: server.mail_log: cannot open {tmp_path / 'mail.log'}: Permission denied\n"
    )


# -- the real daemon ------------------------------------------------------------------------------


def test_daemon_writes_mail_lines_to_the_mail_log(tmp_path):
    from daemon import CLEAN_EXIT, DOMAIN, Daemon, config_text, delivered_with, message, send, wait_for

    text = config_text().replace("[server]\n", '[server]\nmail_log = "mail.log"\n', 1)
    d = Daemon(tmp_path, text).start()
    path = os.path.join(d.home, "mail.log")
    try:
        qid = send(d, f"alice@{DOMAIN}", message(f"alice@{DOMAIN}", "ml1"))
        delivered_with(d, "alice", "ml1")
        wait_for(lambda: f"{qid}: removed" in read(path), 10, "the removed line")
        # the session's last line: delivered on accept, the message may be
        # removed before the server has seen the client go
        wait_for(lambda: "disconnect from [127.0.0.1]" in read(path), 10, "the disconnect line")
    finally:
        assert d.stop() == CLEAN_EXIT, d.stderr()
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[mailhub\.mail#info\] "
    lines = read(path).splitlines()
    mine = [l for l in lines if qid in l]
    assert len(mine) == 3, lines
    assert re.fullmatch(stamp + qid + r": accepted from=<sender@client\.test> nrcpt=1 .* proto=ESMTP .*", mine[0])
    assert re.fullmatch(stamp + qid + rf": to=<alice@{DOMAIN}>, .* status=sent .*", mine[1])
    assert re.fullmatch(stamp + qid + r": removed", mine[2])
    assert re.fullmatch(stamp + r"connect from \[127\.0\.0\.1\] listener=smtp tls=False", lines[0]), lines
    log = d.log()
    assert f"mail log: {path}" in log
    assert "listening for SMTP" in log
    assert qid not in log and "[mailhub.mail#" not in log
    assert "Traceback" not in log and d.stderr() == ""
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o007 == 0


def test_reopen_follows_a_rotation_at_once(tmp_path, mail_log):
    """SIGHUP (logrotate's postrotate) reopens a renamed mail log before the next periodic check."""
    path = tmp_path / "mail.log"
    mail_log({"log_namespace": "mailhub.mail", "log_format": "one", maillog._TEXT: "one", "log_time": 1000.0})
    os.rename(path, tmp_path / "mail.log.1")
    mail_log.reopen()
    mail_log({"log_namespace": "mailhub.mail", "log_format": "two", maillog._TEXT: "two", "log_time": 1000.0})
    assert read(tmp_path / "mail.log.1").endswith("one\n")
    assert read(path).endswith("two\n")
