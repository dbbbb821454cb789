"""mailhub.daemon.reload: the live holder, delegates, and what a reload applies, refuses and leaves for a restart."""

from __future__ import annotations

import dataclasses
import os
import signal
from types import MappingProxyType

from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher

from mailhub.config import ConfigError, load_config
from mailhub.daemon.reload import Delegate, Live, Reloader, changed_keys, install_sighup, target


def _config(tmp_path, **local):
    base = load_config(None, {"local.domains": ["example.test"]}, str(tmp_path))
    return dataclasses.replace(base, local=dataclasses.replace(base.local, **local))


class Component:
    def __init__(self, name):
        self.name = name

    def who(self):
        return self.name


def test_delegate_reads_the_current_component(tmp_path):
    config = _config(tmp_path)
    live = Live(config, directory=Component("old"))
    d = Delegate(live, "directory")
    who = d.who  # a bound method taken before the swap stays the old one's...
    live.swap(config, directory=Component("new"))
    assert d.who() == "new"  # ...but every new lookup sees the swap
    assert who() == "old"
    assert target(d).name == "new"
    assert target("x") == "x"


def test_changed_keys_and_routes(tmp_path):
    a = _config(tmp_path)
    b = dataclasses.replace(a, relay=dataclasses.replace(a.relay, routes=MappingProxyType({"x.test": "[127.0.0.1]:25"})))
    c = dataclasses.replace(b, local=dataclasses.replace(b.local, users=("carol",)))
    assert changed_keys(a, a) == []
    assert changed_keys(a, c) == ["local.users", "relay.routes"]


def _reloader(tmp_path, new, events):
    old = _config(tmp_path)
    live = Live(old, directory=Component("old"))
    built = []

    def build(config, running):
        built.append(config)
        return {"directory": Component("new")}

    reloader = Reloader(live, new, build, also=lambda: events.append("also"))
    return live, reloader, built


def test_applied_and_restart_keys(tmp_path):
    events: list = []
    new = _config(tmp_path, users=("carol",))
    new = dataclasses.replace(new, server=dataclasses.replace(new.server, smtp=("tcp:2526",)))
    live, reloader, built = _reloader(tmp_path, lambda: new, events)
    logged: list = []
    globalLogPublisher.addObserver(logged.append)
    try:
        outcome = reloader.reload()
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert outcome.applied and outcome.restart == ("server.smtp",)
    assert outcome.summary() == "configuration reloaded: local.users applied; needs a restart: server.smtp"
    assert live.config is new and live.directory.name == "new" and events == ["also"]
    assert [e["summary"] for e in logged if "summary" in e] == [outcome.summary()]


def test_fixed_keys_are_left_for_a_restart(tmp_path):
    """
    With the privileged delivery processes started before the daemon gave
    up root, their settings (the local. keys) wait for a restart; the rest
    of a reload still applies.
    """
    old = _config(tmp_path)
    new = _config(tmp_path, users=("carol",))
    new = dataclasses.replace(new, relay=dataclasses.replace(new.relay, smarthost="[127.0.0.1]:2525"))
    live = Live(old, directory=Component("old"))
    reloader = Reloader(live, lambda: new, lambda config, running: {"directory": Component("new")}, fixed=("local.",))
    outcome = reloader.reload()
    assert outcome.applied and outcome.restart == ("local.users",)
    assert outcome.summary() == "configuration reloaded: relay.smarthost applied; needs a restart: local.users"


def test_broken_configuration_is_refused_and_the_running_one_stays(tmp_path):
    events: list = []

    def broken():
        raise ConfigError("mailhub.toml: relay.max_backoff: must be a duration")

    live, reloader, built = _reloader(tmp_path, broken, events)
    old = live.config
    logged: list = []
    globalLogPublisher.addObserver(logged.append)
    try:
        outcome = reloader.reload()
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert not outcome.applied and built == []
    assert live.config is old and live.directory.name == "old"
    assert outcome.summary() == (
        "reload refused, keeping the running configuration: mailhub.toml: relay.max_backoff: must be a duration"
    )
    assert [e["log_level"] for e in logged if "summary" in e] == [LogLevel.error]
    assert events == ["also"]  # the certificate and log files are still looked at


def test_sighup_schedules_the_reload_in_the_reactor():
    clock = Clock()
    calls: list = []
    clock.callFromThread = lambda f, *a: calls.append(f)
    restore = install_sighup(lambda: "done", clock)
    try:
        os.kill(os.getpid(), signal.SIGHUP)
    finally:
        restore()
    assert len(calls) == 1
    calls[0]()


def test_restart_keys_are_compared_with_what_runs(tmp_path):
    """
    A listener changed in the file waits for a restart, and is named at
    every reload until then; put back to the running value it needs nothing.
    """
    started = _config(tmp_path)
    moved = dataclasses.replace(started, server=dataclasses.replace(started.server, smtp=("tcp:2526",)))
    files = [moved, moved, started]
    live = Live(started, directory=Component("old"))
    reloader = Reloader(live, lambda: files.pop(0), lambda config, running: {"directory": Component("new")})
    assert reloader.reload().summary() == "configuration reloaded: no change applied; needs a restart: server.smtp"
    assert reloader.reload().summary() == "configuration reloaded: no change applied; needs a restart: server.smtp"
    assert reloader.reload().summary() == "configuration reloaded: no change applied"


def test_authentication_keys_wait_for_a_restart(tmp_path):
    events: list = []
    new = _config(tmp_path)
    new = dataclasses.replace(new, dkim=dataclasses.replace(new.dkim, keys="/etc/mailhub/dkim"),
                              mailauth=dataclasses.replace(new.mailauth, verify=True))
    _live, reloader, _built = _reloader(tmp_path, lambda: new, events)
    outcome = reloader.reload()
    assert outcome.restart == ("dkim.keys", "mailauth.verify")
