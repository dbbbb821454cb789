"""
mailhub.maillog.mail_event hands its event straight to the publisher: the
event, and what every consumer makes of it (twistd's text log, the mail
log file, the event log, the metrics), is what twisted.logger's
Logger.info would have built, for odd templates and fields too.
"""

from __future__ import annotations

import json

import pytest
from twisted.logger import Logger, LogPublisher, formatEvent

from mailhub import maillog


def reference_mail_event(publisher, event: str, format: str, **fields):
    """
    The reference for mail_event: the same event built by twisted.logger's
    Logger.info onto C{publisher}.  mail_event builds the event dict itself
    (cheaper on the hot path); this is the oracle it must agree with.
    """
    logger = Logger(namespace="mailhub.mail", observer=publisher)
    fields.setdefault("queue_id", "-")
    try:
        text = format.format_map(fields)
    except Exception:
        logger.info(format, mail_event=event, **fields)
        return
    fields[maillog._TEXT] = text
    if "{" in text or "}" in text:
        text = text.replace("{", "{{").replace("}", "}}")
    logger.info(text, mail_event=event, **fields)


ODD_EVENTS = [
    ("accepted", "{queue_id}: from=<{sender}> size={size}", {"queue_id": "15NXA", "sender": "a@b", "size": 10}),
    ("x", "braces {v}", {"v": "{not a field} }{ {{"}),
    ("x", "non-ASCII {v}", {"v": "\u00fc\u7528\udcff\x00\n"}),
    ("x", "no queue id"),
    ("x", "bad template {missing}", {}),
    ("x", "log-ish {log_text}", {"log_text": "shadow"}),
    ("x", "{log_format}", {"log_format": "mine"}),
    ("x", "{log_level}", {"log_level": "mine"}),
    ("x", "{log_namespace} {log_source}", {"log_namespace": "n", "log_source": "s"}),
    ("x", "{log_logger}", {"log_logger": "l"}),
    ("x", "{log_failure}", {"log_failure": "f"}),
    ("x", "nested {d[a]}", {"d": {"a": [1, 2]}}),
]


@pytest.mark.parametrize("case", ODD_EVENTS, ids=lambda c: c[1][:20])
def test_mail_event_builds_the_event_logger_info_builds(monkeypatch, case):
    event, fmt, fields = (case + ({},))[:3] if len(case) == 2 else case
    seen, reference_seen = [], []
    pub, reference_pub = LogPublisher(seen.append), LogPublisher(reference_seen.append)
    monkeypatch.setattr(maillog, "mail_publisher", pub)
    monkeypatch.setattr(maillog, "maillog", Logger(namespace="mailhub.mail", observer=pub))
    maillog.mail_event(event, fmt, **dict(fields))
    reference_mail_event(reference_pub, event, fmt, **dict(fields))
    [got], [expected] = seen, reference_seen
    for e in (got, expected):
        e.pop("log_time")
        e.pop("log_logger")
    assert got == expected
    assert formatEvent(got) == formatEvent(expected)


@pytest.mark.parametrize("case", ODD_EVENTS, ids=lambda c: c[1][:20])
def test_every_consumer_sees_what_logger_info_would_give(monkeypatch, tmp_path, case):
    """twistd's text log, the mail log file, the event log, metrics: the same lines and records as from Logger.info."""
    from twisted.logger import formatEventAsClassicLogText

    from mailhub import eventlog

    event, fmt, fields = (case + ({},))[:3] if len(case) == 2 else case
    out = {}
    for which in ("mail_event", "reference"):
        seen: list = []
        pub = LogPublisher(seen.append)
        if which == "mail_event":
            monkeypatch.setattr(maillog, "mail_publisher", pub)
            monkeypatch.setattr(maillog, "maillog", Logger(namespace="mailhub.mail", observer=pub))
            maillog.mail_event(event, fmt, **dict(fields))
        else:
            reference_mail_event(pub, event, fmt, **dict(fields))
        [e] = seen
        e["log_time"] = 1700000000.0
        mail_log = maillog.MailLogFile(str(tmp_path / f"mail-{which}.log"))
        try:
            line = mail_log.format(e)
        finally:
            mail_log.close()
        out[which] = (
            formatEventAsClassicLogText(e),
            line,
            json.dumps(eventlog.event_record(e), sort_keys=True, default=repr),
            e.get("mail_event"),
        )
        monkeypatch.undo()
    assert out["mail_event"] == out["reference"]
