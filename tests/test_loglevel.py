"""The log level filter of twistd's log (mailhub/loglevel.py)."""

from __future__ import annotations

import io
import sys
from types import SimpleNamespace

import pytest
from twisted.logger import FilteringLogObserver, LogBeginner, Logger, LogLevel, LogPublisher

from mailhub import loglevel
from mailhub.config import ConfigError, load_config


def _passes(predicate, namespace: str, level: LogLevel) -> bool:
    seen: list[dict] = []
    FilteringLogObserver(seen.append, [predicate])({"log_namespace": namespace, "log_level": level, "log_format": "x"})
    return bool(seen)


def test_info_hides_twisted_info_chatter_and_keeps_mailhub_info():
    p = loglevel.make_predicate("info")
    assert _passes(p, "mailhub.mail", LogLevel.info)  # the mail lines
    assert _passes(p, "mailhub.tap", LogLevel.info)
    assert not _passes(p, "mailhub.tap", LogLevel.debug)
    assert not _passes(p, "log_legacy", LogLevel.info)  # "(TCP Port 8025 Closed)", "Site starting on"
    assert not _passes(p, "twisted.web.server.Site", LogLevel.info)  # "Starting factory"
    assert not _passes(p, "twisted.internet.base", LogLevel.info)
    assert _passes(p, "twisted.internet.base", LogLevel.warn)
    assert _passes(p, "log_legacy", LogLevel.critical)  # log.err


def test_debug_shows_everything():
    p = loglevel.make_predicate("debug")
    for namespace in ("mailhub.smtp.server", "twisted.web.server.Site", "log_legacy"):
        assert _passes(p, namespace, LogLevel.debug)
        assert _passes(p, namespace, LogLevel.info)


@pytest.mark.parametrize("name, least", [("warn", LogLevel.warn), ("error", LogLevel.error)])
def test_warn_and_error(name, least):
    p = loglevel.make_predicate(name)
    for namespace in ("mailhub.mail", "twisted.internet.base", "log_legacy"):
        assert not _passes(p, namespace, LogLevel.info)
        assert _passes(p, namespace, least)
        assert _passes(p, namespace, LogLevel.critical)
    assert _passes(p, "mailhub.delivery.directory", LogLevel.warn) == (name == "warn")


def test_install_filters_the_observers_logging_begins_with_and_set_level_changes_it(monkeypatch):
    monkeypatch.setattr(loglevel, "predicate", loglevel.make_predicate("info"))
    publisher = LogPublisher()
    beginner = LogBeginner(publisher, io.StringIO(), sys, SimpleNamespace(showwarning=None))
    seen: list[dict] = []
    loglevel.install("warn", beginner)
    loglevel.install("warn", beginner)  # a second call only sets the level
    beginner.beginLoggingTo([seen.append], redirectStandardIO=False)
    log = Logger(namespace="mailhub.test", observer=publisher)
    log.info("hidden")
    log.warn("shown")
    loglevel.set_level("info")  # a reload
    log.info("now shown")
    log.debug("hidden too")
    assert [e["log_format"] for e in seen] == ["shown", "now shown"]


def test_configuration_key_and_default(tmp_path):
    assert load_config(None).server.log_level == "info"
    conf = tmp_path / "mailhub.toml"
    conf.write_text('[server]\nlog_level = "debug"\n')
    assert load_config(str(conf)).server.log_level == "debug"
    assert load_config(str(conf), {"server.log_level": "error"}).server.log_level == "error"
    conf.write_text('[server]\nlog_level = "verbose"\n')
    with pytest.raises(ConfigError, match="server.log_level"):
        load_config(str(conf))
