"""
Tests for the mailhub console script, run as a real subprocess
(C{python -m mailhub.cli.main}) so exit codes and streams are the real ones.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mailhub.cli.main import main
from mailhub.daemon.reload import target

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, cwd, env_extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("MAILHUB_CONFIG", None)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "mailhub.cli.main", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_check_config_ok(tmp_path):
    conf = tmp_path / "m.toml"
    conf.write_text('[server]\nsmtp = ["tcp:2525:interface=127.0.0.1"]\nmax_recipients = 7\n[spool]\npath = "q"\n')
    r = run(["--config", str(conf), "check-config"], tmp_path)
    assert (r.returncode, r.stderr) == (0, "")
    lines = r.stdout.splitlines()
    assert lines[0] == f"# source: {conf}"
    assert 'smtp = ["tcp:2525:interface=127.0.0.1"]' in lines
    assert "max_recipients = 7" in lines
    assert f'path = "{tmp_path / "q"}"' in lines
    assert f'mailboxes = "{tmp_path / "mailhub-data" / "mailboxes"}"' in lines
    assert "[relay]" in lines and "concurrency = 100" in lines


def test_check_config_env_var(tmp_path):
    conf = tmp_path / "env.toml"
    conf.write_text("[relay]\nconcurrency = 3\n")
    r = run(["check-config"], tmp_path, {"MAILHUB_CONFIG": str(conf)})
    assert r.returncode == 0
    assert f"# source: {conf}" in r.stdout and "concurrency = 3" in r.stdout.splitlines()


def test_check_config_error(tmp_path):
    conf = tmp_path / "bad.toml"
    conf.write_text("[server]\nmax_recipients = -3\n")
    r = run(["--config", str(conf), "check-config"], tmp_path)
    assert r.returncode == 78
    assert r.stdout == ""
    assert r.stderr == f"mailhub: {conf}: server.max_recipients: must be a positive integer, got -3\n"


def test_check_config_missing_file(tmp_path):
    r = run(["-c", "nope.toml", "check-config"], tmp_path)
    assert r.returncode == 78
    assert r.stderr == "mailhub: nope.toml: cannot read: No such file or directory\n"


# -- check-config reports what the daemon meets at start ----------------------------------


def check(tmp_path, toml: str, **files: str):
    """Write C{m.toml} and C{files} into tmp_path and run check-config on it."""
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    conf = tmp_path / "m.toml"
    conf.write_text(toml)
    return run(["--config", str(conf), "check-config"], tmp_path), conf


def test_check_config_aliases_syntax_error_is_the_daemons_line(tmp_path):
    r, conf = check(tmp_path, '[local]\naliases = "aliases"\n', aliases="root: alice\nno colon here\n")
    line = f"mailhub: {tmp_path / 'aliases'}:2: missing ':' after the alias name\n"
    assert (r.returncode, r.stdout, r.stderr) == (78, "", line)
    # the daemon stops with the very same line and status
    daemon = subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "mailhub",
         "--config", str(conf), "--smtp", "tcp:0:interface=127.0.0.1",
         *(["--user=root"] if os.geteuid() == 0 else [])],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=60,
    )
    assert daemon.returncode == 78
    assert daemon.stderr.endswith(line)


@pytest.mark.parametrize("target, kind", [('"|/usr/bin/vacation bob"', "pipe"), ("/var/log/mail.txt", "file")])
def test_check_config_reports_command_and_file_targets(tmp_path, target, kind):
    r, _ = check(tmp_path, '[local]\naliases = "aliases"\n',
                 aliases=f"root: alice\n# comment\nbob: {target}, carol\n")
    assert (r.returncode, r.stdout) == (78, "")
    assert r.stderr == (
        f"mailhub: aliases: {tmp_path / 'aliases'}:3: alias 'bob': {kind} target {target!r} is not supported "
        "(mailhub never runs commands or writes files named in aliases); mail for it is rejected with 550 5.3.0\n"
    )


def test_check_config_shows_alias_warnings_and_passes(tmp_path):
    r, _ = check(tmp_path, '[local]\naliases = "aliases"\n', aliases="root: alice\nROOT: bob\n")
    assert r.returncode == 0
    assert r.stderr == (
        f"mailhub: warning: aliases: {tmp_path / 'aliases'}:2: duplicate alias 'ROOT' ignored, the first one is used\n"
    )
    assert r.stdout.startswith("# source: ")


def test_check_config_missing_users_file(tmp_path):
    r, conf = check(tmp_path, '[auth]\nusers = "users"\n')
    assert (r.returncode, r.stdout) == (78, "")
    assert r.stderr == (
        f"mailhub: {conf}: auth.users: no such file {tmp_path / 'users'} "
        "(nobody can log in until 'mailhub user add' creates it)\n"
    )


def test_check_config_malformed_users_file(tmp_path):
    r, _ = check(tmp_path, '[auth]\nusers = "users"\n', users="# users\nalice@example.org\n")
    assert (r.returncode, r.stdout) == (78, "")
    assert r.stderr == (
        f"mailhub: users file {tmp_path / 'users'}, line 2: expected address:bcrypt-hash; line ignored\n"
    )


def test_check_config_good_users_and_aliases_files(tmp_path):
    from mailhub.users import hash_password

    r, _ = check(tmp_path, '[local]\naliases = "aliases"\n[auth]\nusers = "users"\n',
                 aliases="root: alice\n", users=f"alice@example.org:{hash_password('pw', rounds=4)}\n")
    assert (r.returncode, r.stderr) == (0, "")


def test_check_config_every_problem_one_line_each(tmp_path):
    r, _ = check(tmp_path, '[local]\naliases = "aliases"\n[auth]\nusers = "users"\n',
                 aliases='a: "|x"\nb: "|y"\n')
    assert r.returncode == 78
    lines = r.stderr.splitlines()
    assert len(lines) == 3
    assert ":1: alias 'a'" in lines[0] and ":2: alias 'b'" in lines[1] and "auth.users" in lines[2]


@pytest.mark.parametrize("key, status, text", [
    ("spool", 71, "cannot create spool {path}: Permission denied"),
    ("mailboxes", 78, "{conf}: local.mailboxes: cannot write in {path}: Permission denied "
                      "(every local delivery would be deferred)"),
])
def test_check_config_unwritable_directories(tmp_path, monkeypatch, capsys, key, status, text):
    """As the daemon's user would see them (os.access; root passes every access check, so faked here)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    path = locked / key
    conf = tmp_path / "m.toml"
    conf.write_text(f'[spool]\npath = "{tmp_path / "spool"}"\n[local]\nmailboxes = "{tmp_path / "mb"}"\n'
                    .replace(str(tmp_path / ("spool" if key == "spool" else "mb")), str(path)))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(locked) else real_access(p, mode))
    assert main(["--config", str(conf), "check-config"]) == status
    captured = capsys.readouterr()
    assert captured.err == "mailhub: " + text.format(path=path, conf=conf) + "\n"
    assert captured.out == ""


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["--bogus", "check-config"]])
def test_usage_errors(tmp_path, args):
    r = run(args, tmp_path)
    assert r.returncode == 64
    assert r.stderr.splitlines()[-1].startswith("mailhub: ")
    assert "check-config" in r.stderr  # the usage text lists the commands


def test_main_in_process(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MAILHUB_CONFIG", raising=False)
    monkeypatch.setattr("mailhub.config.DEFAULT_CONFIG_FILE", str(tmp_path / "absent.toml"))
    assert main(["--data", "d", "check-config"]) == 0
    out = capsys.readouterr().out
    assert f'path = "{tmp_path / "d" / "spool"}"' in out


def test_console_script_entry_point():
    # setup.cfg's console_scripts names mailhub.cli.main:main
    with open(os.path.join(ROOT, "setup.cfg")) as f:
        text = f.read()
    assert "mailhub = mailhub.cli.main:main" in text
    assert "mailhub-sendmail = mailhub.cli.sendmail:main" in text


def test_readme_and_ci_run_the_same_test_command():
    # .ci/run must run exactly the command README.rst gives for the tests.
    command = "python3 -m venv .venv && .venv/bin/pip install '.[test]' && .venv/bin/python -m pytest -q"
    with open(os.path.join(ROOT, "README.rst")) as f:
        readme = f.read()
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    assert f"\n    {command}\n" in readme
    assert ci.rstrip("\n").splitlines()[-1] == command


# -- twistd mailhub options (mailhub/tap.py) ---------------------------------------------------


def tap_options(args, tmp_path, monkeypatch):
    from mailhub import tap

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MAILHUB_CONFIG", raising=False)
    monkeypatch.setattr("mailhub.config.DEFAULT_CONFIG_FILE", str(tmp_path / "absent.toml"))
    options = tap.Options()
    if os.geteuid() == 0 and not any(a.startswith("--user") for a in args):
        args = [*args, "--user=root"]  # stays root (tests/test_privileges.py covers the switch)
    options.parseOptions(args)
    return options


def test_tap_options_override_config(tmp_path, monkeypatch):
    conf = tmp_path / "m.toml"
    conf.write_text('[server]\nsmtp = ["tcp:25"]\n[local]\ndomains = ["file.example"]\n')
    o = tap_options(
        ["--config", str(conf), "--smtp", "tcp:2525:interface=127.0.0.1", "--smtp", "unix:s.sock",
         "--domain", "a.example", "--domain", "B.example", "--hostname", "mx.a.example", "--data", "d"],
        tmp_path, monkeypatch,
    )
    c = o.config
    assert c.source == str(conf)
    assert c.server.smtp == ("tcp:2525:interface=127.0.0.1", "unix:s.sock")
    assert c.local.domains == ("a.example", "b.example")
    assert c.server.hostname == "mx.a.example"
    assert c.spool.path == str(tmp_path / "d" / "spool")


def test_tap_options_defaults(tmp_path, monkeypatch):
    c = tap_options([], tmp_path, monkeypatch).config
    assert c.source is None
    assert c.server.smtp == ("tcp:8025:interface=127.0.0.1",)
    assert c.spool.path == str(tmp_path / "mailhub-data" / "spool")


def test_tap_bad_config_exits_78_with_one_line(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        tap_options(["--domain", "bad domain"], tmp_path, monkeypatch)
    assert e.value.code == 78
    assert capsys.readouterr().err == (
        "mailhub: command line: local.domains: invalid domain 'bad domain': invalid domain\n"
    )


def test_make_service_order(tmp_path, monkeypatch):
    """
    The scheduler (spool recovery) starts before anything that feeds it:
    pickup, the control socket, then the SMTP listeners.
    """
    # the daemon's own SMTP factories: the single-process shape (processes = 1;
    # with more, acceptor processes build them: tests/test_acceptors.py)
    monkeypatch.setattr("mailhub.daemon.acceptors.processes_for", lambda value: 1)
    from twisted.application.internet import TimerService

    from mailhub import tap
    from mailhub.metrics import MetricsObserver
    from mailhub.queue.pickup import PickupService
    from mailhub.queue.scheduler import Scheduler
    from mailhub.relay.agent import RemoteDelivery

    o = tap_options(["--smtp", "tcp:0:interface=127.0.0.1", "--smtp", "tcp:0:interface=127.0.0.2"],
                    tmp_path, monkeypatch)
    top = tap.makeService(o)
    children = list(top)
    assert isinstance(children[0], tap._StartupLog)
    # the metrics observer and the status page sampler come before anything that logs mail events
    assert isinstance(children[1], tap._Observer)
    assert isinstance(children[1].observer, MetricsObserver)
    # the event log (on by default, under the data directory)
    from mailhub.eventlog import EventLogObserver

    assert isinstance(children[2], tap._Observer) and isinstance(children[2].observer, EventLogObserver)
    assert children[2].observer.path == str(tmp_path / "mailhub-data" / "events.jsonl")
    # the history (on by default, under the data directory)
    from mailhub.history.recorder import Recorder

    assert isinstance(children[3], Recorder) and children[3].store.path == str(tmp_path / "mailhub-data" / "history.sqlite")
    assert isinstance(children[4], TimerService) and children[4].step == 60
    children = [children[0], *children[5:]]
    # local delivery processes (started before the scheduler, stopped after it)
    from mailhub.delivery.localproc import LocalDeliveryProcesses

    assert isinstance(children[1], LocalDeliveryProcesses) and children[1].count == 1
    local_agent = children.pop(1)
    assert isinstance(children[1], RemoteDelivery)
    # the authentication service (its thread pool) starts before anything that signs or checks
    from mailhub.auth.service import AuthService

    assert isinstance(children.pop(2), AuthService)
    assert isinstance(children[2], Scheduler)
    assert isinstance(children[3], PickupService)
    control = children[4]
    assert isinstance(control, tap._Listener) and control.kind == "control"
    assert control.description == str(tmp_path / "mailhub-data" / "spool" / "control.sock")
    listeners = children[5:]
    assert [l.description for l in listeners] == ["tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.2"]
    assert [l.kind for l in listeners] == ["smtp", "smtp"]
    assert all(isinstance(l, tap._Listener) and not l.running for l in listeners)
    assert os.path.isdir(tmp_path / "mailhub-data" / "spool" / "envelopes")
    # the router hands non-local recipients to the remote agent
    scheduler = children[2]
    assert target(scheduler.deliver.remote) is children[1]
    assert scheduler.deliver.local is local_agent
    assert scheduler.postmaster == "postmaster@localhost"


def test_make_service_relay_wiring(tmp_path, monkeypatch):
    from mailhub import tap
    from mailhub.relay.nexthop import Destination

    (tmp_path / "pw").write_text("secret\n")
    conf = tmp_path / "m.toml"
    conf.write_text(
        '[server]\nhostname = "mx.first.example"\nsmtp = ["tcp:0:interface=127.0.0.1"]\n'
        '[local]\ndomains = ["first.example", "second.example"]\n'
        '[relay]\nsmarthost = "[smtp.provider.example]:587"\nsmarthost_user = "me"\n'
        'smarthost_password_file = "pw"\nport = 2525\n'
        '[relay.routes]\n"partner.example" = "[127.0.0.1]:10025"\n"direct.example" = ""\n'
    )
    top = tap.makeService(tap_options(["--config", str(conf)], tmp_path, monkeypatch))
    remote = top.getServiceNamed("remote")
    assert remote.route("partner.example") == Destination("127.0.0.1", 10025, mx=False, explicit=True)
    assert remote.route("elsewhere.example") == Destination("smtp.provider.example", 587, mx=False, explicit=True)
    assert remote.route("direct.example") == Destination("direct.example", 2525, mx=True, explicit=False)
    scheduler = top.getServiceNamed("scheduler")
    assert scheduler.postmaster == "postmaster@first.example"
    assert scheduler.hostname == "mx.first.example"


def test_make_service_submission_listeners(tmp_path, monkeypatch):
    # the daemon's own SMTP factories: the single-process shape (processes = 1;
    # with more, acceptor processes build them: tests/test_acceptors.py)
    monkeypatch.setattr("mailhub.daemon.acceptors.processes_for", lambda value: 1)
    import signal

    from mailhub import tap
    from mailhub.tls import ServerTLS, make_self_signed
    from mailhub.users import UsersFile

    make_self_signed("mx.example", str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    conf = tmp_path / "m.toml"
    conf.write_text(
        '[server]\nsmtp = ["tcp:0:interface=127.0.0.1"]\nsubmission = ["tcp:0:interface=127.0.0.1"]\n'
        'smtps = ["tcp:0:interface=127.0.0.1"]\ntls_cert = "c.pem"\ntls_key = "k.pem"\n'
        '[auth]\nusers = "users"\n'
    )
    previous = signal.getsignal(signal.SIGHUP)
    try:
        top = tap.makeService(tap_options(["--config", str(conf)], tmp_path, monkeypatch))
        assert signal.getsignal(signal.SIGHUP) is not previous  # certificate reload on SIGHUP
    finally:
        signal.signal(signal.SIGHUP, previous)
    listeners = [c for c in top if isinstance(c, tap._Listener) and c.kind != "control"]
    assert [l.kind for l in listeners] == ["smtp", "submission", "smtps"]
    factories = [l.factory for l in listeners]
    assert [f.listener for f in factories] == ["smtp", "submission", "smtps"]
    tls = factories[0].tls
    assert isinstance(tls, ServerTLS)
    assert all(f.tls is tls for f in factories)  # one certificate, reloaded for all
    assert isinstance(target(factories[0].users), UsersFile)
    assert all(f.users is factories[0].users for f in factories)
    assert all(f.throttle is factories[0].throttle for f in factories)  # failures count across listeners


def test_make_service_passes_smtpd_limits(tmp_path, monkeypatch):
    # the daemon's own SMTP factories: the single-process shape (processes = 1;
    # with more, acceptor processes build them: tests/test_acceptors.py)
    monkeypatch.setattr("mailhub.daemon.acceptors.processes_for", lambda value: 1)
    # server.max_hops and server.min_data_rate reach every SMTP listener
    from mailhub import tap

    conf = tmp_path / "m.toml"
    conf.write_text('[server]\nsmtp = ["tcp:0:interface=127.0.0.1"]\nmax_hops = 7\nmin_data_rate = 0\n')
    top = tap.makeService(tap_options(["--config", str(conf)], tmp_path, monkeypatch))
    factories = [c.factory for c in top if isinstance(c, tap._Listener) and c.kind == "smtp"]
    assert [(f.config.max_hops, f.config.min_data_rate) for f in factories] == [(7, 0)]
    top = tap.makeService(tap_options(["--smtp", "tcp:0:interface=127.0.0.1"], tmp_path, monkeypatch))
    factories = [c.factory for c in top if isinstance(c, tap._Listener) and c.kind == "smtp"]
    assert [(f.config.max_hops, f.config.min_data_rate) for f in factories] == [(50, 500)]


def test_make_service_bad_certificate_exits_78(tmp_path, monkeypatch, capsys):

    (tmp_path / "c.pem").write_text("not a certificate")
    (tmp_path / "k.pem").write_text("not a key")
    conf = tmp_path / "m.toml"
    conf.write_text('[server]\ntls_cert = "c.pem"\ntls_key = "k.pem"\n')
    with pytest.raises(SystemExit) as e:
        tap_options(["--config", str(conf)], tmp_path, monkeypatch)
    assert e.value.code == 78
    err = capsys.readouterr().err
    assert err.startswith(f"mailhub: {conf}: server.tls_cert: {tmp_path / 'c.pem'}")
    assert err.count("\n") == 1


# -- the other commands: queue, user, make-cert --------------------------------------------------


def test_queue_command(tmp_path):
    from mailhub.queue.spool import Spool

    Spool(str(tmp_path / "q"))
    conf = tmp_path / "m.toml"
    conf.write_text('[spool]\npath = "q"\n')
    r = run(["-C", str(conf), "queue", "list"], tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (0, "Mail queue is empty\n", "")
    r = run(["--config", str(conf), "queue"], tmp_path)  # list is the default
    assert (r.returncode, r.stdout) == (0, "Mail queue is empty\n")
    r = run(["--config", str(conf), "queue", "delete", "0BXK3M4Q2ZR7TW8NP"], tmp_path)
    assert r.returncode == 66
    assert r.stderr == "mailhub queue: 0BXK3M4Q2ZR7TW8NP: no such message\n"


def test_queue_command_bad_config(tmp_path):
    r = run(["-C", "nope.toml", "queue", "list"], tmp_path)
    assert (r.returncode, r.stderr) == (78, "mailhub: nope.toml: cannot read: No such file or directory\n")


def test_user_command_uses_auth_users(tmp_path):
    conf = tmp_path / "m.toml"
    conf.write_text('[auth]\nusers = "users"\n')
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("MAILHUB_CONFIG", None)
    r = subprocess.run(
        [sys.executable, "-m", "mailhub.cli.main", "-C", str(conf), "user", "add", "Alice@Example.ORG",
         "--password-stdin"],
        input="correct horse\n", cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert (r.returncode, r.stderr) == (0, "mailhub: added user alice@example.org\n")
    assert (tmp_path / "users").read_text().startswith("alice@example.org:$2")
    r = run(["-C", str(conf), "user", "list"], tmp_path)
    assert (r.returncode, r.stdout) == (0, "alice@example.org\n")
    # --file needs no configuration at all
    r = run(["-C", "nope.toml", "user", "--file", str(tmp_path / "users"), "list"], tmp_path)
    assert (r.returncode, r.stdout) == (0, "alice@example.org\n")
    # without auth.users and --file: a usage error
    r = run(["-C", str(tmp_path / "none.toml"), "user", "list"], tmp_path)
    assert r.returncode == 78
    (tmp_path / "none.toml").write_text("")
    r = run(["-C", str(tmp_path / "none.toml"), "user", "list"], tmp_path)
    assert (r.returncode, r.stderr) == (
        64, "mailhub: no users file: set auth.users in the configuration or use --file\n"
    )


def test_make_cert_command(tmp_path):
    r = run(["make-cert", "--hostname", "mx.example", "--cert", "c.pem", "--key", "k.pem", "--days", "2"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "mailhub: wrote c.pem and k.pem for mx.example, valid 2 days\n"
    assert oct((tmp_path / "k.pem").stat().st_mode & 0o777) == "0o600"
    r = run(["make-cert", "--hostname", "mx.example", "--cert", "c.pem", "--key", "k.pem"], tmp_path)
    assert (r.returncode, r.stderr) == (73, "mailhub: c.pem exists (use --force to replace it)\n")
    r = run(["make-cert", "--cert", "c.pem"], tmp_path)
    assert r.returncode == 64 and "--hostname is required" in r.stderr


def test_plugin_is_found_from_the_source_tree():
    r = subprocess.run(
        [sys.executable, "-c",
         "from twisted.plugin import getPlugins; from twisted.application.service import IServiceMaker;"
         "print(sorted(p.tapname for p in getPlugins(IServiceMaker) if p.tapname == 'mailhub'))"],
        cwd="/", env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=60,
    )
    assert r.stdout.strip() == "['mailhub']", r.stderr


# -- HTTP, metrics, event log, system mode in makeService -------------------------------------


def test_make_service_http_and_observers(tmp_path, monkeypatch):
    from twisted.logger import globalLogPublisher

    from mailhub import tap
    from mailhub.eventlog import EventLogObserver
    from mailhub.maillog import mail_event
    from mailhub.metrics import MetricsObserver
    from mailhub.users import UsersFile
    from mailhub.web.api import ApiSite

    conf = tmp_path / "m.toml"
    conf.write_text(
        '[server]\nsmtp = ["tcp:0:interface=127.0.0.1"]\n'
        'http = ["tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.2"]\n'
        'http_max_body = 5000\nhttp_admins = ["Root@Example.org"]\nevent_log = "events.jsonl"\n'
        '[local]\ndomains = ["example.org"]\n[auth]\nusers = "users"\n'
    )
    top = tap.makeService(tap_options(["--config", str(conf)], tmp_path, monkeypatch))
    observers = [c for c in top if isinstance(c, tap._Observer)]
    assert [type(o.observer) for o in observers] == [MetricsObserver, EventLogObserver]
    http = [c for c in top if isinstance(c, tap._Listener) and c.kind == "http"]
    assert [l.description for l in http] == ["tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.2"]
    site = http[0].factory
    assert isinstance(site, ApiSite) and http[1].factory is site
    assert site.max_body == 5000
    api = site.resource
    assert api.admins == {"root@example.org"}
    assert isinstance(target(api.users), UsersFile)
    assert api.metrics is observers[0].observer.metrics
    assert api.event_log == str(tmp_path / "events.jsonl")
    assert api.enqueue == top.getServiceNamed("scheduler").enqueue
    # recipients are resolved like the pickup service does: aliases, extensions
    assert api.resolve_recipient("postmaster+x@example.org") == ["postmaster@example.org"]
    assert api.resolve_recipient("someone@elsewhere.example") == ["someone@elsewhere.example"]
    # listeners come last
    kinds = [c.kind for c in top if isinstance(c, tap._Listener)]
    assert kinds == ["control", "smtp", "http", "http"]

    # the observers are on the global log publisher only while they run
    for o in observers:
        o.startService()
    try:
        mail_event("accepted", "{queue_id}: accepted", queue_id="0ABC", listener="smtp")
    finally:
        for o in reversed(observers):
            o.stopService()
    mail_event("accepted", "{queue_id}: accepted", queue_id="0ABD", listener="smtp")
    assert observers[0].observer not in globalLogPublisher._observers
    text = (tmp_path / "events.jsonl").read_text()
    assert '"queue_id": "0ABC"' in text and "0ABD" not in text
    metrics = observers[0].observer.metrics
    assert metrics.accepted.labels(listener="smtp")._value.get() == 1


def test_make_service_without_http_has_no_http_listener(tmp_path, monkeypatch):
    from mailhub import tap
    from mailhub.eventlog import EventLogObserver

    top = tap.makeService(tap_options(["--smtp", "tcp:0:interface=127.0.0.1"], tmp_path, monkeypatch))
    assert [c.kind for c in top if isinstance(c, tap._Listener)] == ["control", "smtp"]
    # the event log is on without any setting (GET /v1/messages/ID and mailhub log need it)
    assert [c.observer.path for c in top if isinstance(c, tap._Observer) and isinstance(c.observer, EventLogObserver)] == [
        str(tmp_path / "mailhub-data" / "events.jsonl")]


def test_make_service_event_log_cannot_open(tmp_path, monkeypatch, capsys):
    from mailhub import tap

    conf = tmp_path / "m.toml"
    conf.write_text('[server]\nevent_log = "missing/dir/events.jsonl"\n')
    with pytest.raises(SystemExit) as e:
        tap.makeService(tap_options(["--config", str(conf)], tmp_path, monkeypatch))
    assert e.value.code == 78
    assert capsys.readouterr().err == (
        f"mailhub: {conf}: server.event_log: no such directory {tmp_path / 'missing/dir'}\n"
    )


def test_make_service_system_mode(tmp_path, monkeypatch):
    from mailhub import tap

    (tmp_path / "aliases").write_text("root: someone@elsewhere.example\n")
    conf = tmp_path / "m.toml"
    conf.write_text(
        '[local]\nmode = "system"\nhome_maildir = "Mail/inbox"\nmin_uid = 2000\nmax_uid = 3000\n'
        'aliases = "aliases"\n'
    )
    top = tap.makeService(tap_options(["--config", str(conf)], tmp_path, monkeypatch))
    directory = top.getServiceNamed("scheduler").deliver.directory
    assert directory.mode == "system"
    assert directory.home_maildir == ("Mail", "inbox")
    assert (directory.accounts.min_uid, directory.accounts.max_uid) == (2000, 3000)
    assert directory.aliases_path == str(tmp_path / "aliases")


def test_system_mode_warns_when_not_root(tmp_path, monkeypatch):
    from twisted.logger import globalLogPublisher

    from mailhub import tap

    monkeypatch.setattr("mailhub.config.DEFAULT_ALIASES", str(tmp_path / "absent"))
    conf = tmp_path / "m.toml"
    conf.write_text('[local]\nmode = "system"\n')
    options = tap_options(["--config", str(conf)], tmp_path, monkeypatch)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        startup = tap._StartupLog(options.config)
        startup.privilegedStartService()
        monkeypatch.setattr(os, "geteuid", lambda: 1000)
        startup.startService()
        monkeypatch.setattr(os, "geteuid", lambda: 0)
        tap._StartupLog(options.config).startService()
    finally:
        globalLogPublisher.removeObserver(events.append)
    from twisted.logger import formatEvent

    texts = [formatEvent(e) for e in events if e.get("log_namespace") == "mailhub.tap"]
    assert any("mailboxes ~ACCOUNT/Maildir (system accounts)" in t for t in texts), texts
    warnings = [t for t in texts if "runs as uid" in t]
    assert len(warnings) == 1 and "runs as uid 1000, not root" in warnings[0]


# -- mailhub log, lazy imports ------------------------------------------------------------------


def test_log_command(tmp_path):
    import json

    events = tmp_path / "events.jsonl"
    records = [
        {"event": "accepted", "queue_id": "0AAA", "time": 1700000000.25, "text": "0AAA: accepted from=<a@x.example>"},
        {"event": "accepted", "queue_id": "0BBB", "time": 1700000001.0, "text": "0BBB: accepted from=<b@x.example>"},
        {"event": "delivery", "queue_id": "0AAA", "time": 1700000002.5, "text": "0AAA: to=<c@x.example>, status=sent"},
    ]
    events.write_text("".join(json.dumps(r) + "\n" for r in records))
    conf = tmp_path / "m.toml"
    conf.write_text('[server]\nevent_log = "events.jsonl"\n')
    r = run(["-C", str(conf), "log", "0AAA"], tmp_path)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == (
        "2023-11-14T22:13:20.250Z 0AAA: accepted from=<a@x.example>\n"
        "2023-11-14T22:13:22.500Z 0AAA: to=<c@x.example>, status=sent\n"
    )
    r = run(["-C", "nope.toml", "log", "--file", str(events), "--json", "0BBB"], tmp_path)
    assert (r.returncode, [json.loads(l) for l in r.stdout.splitlines()]) == (0, [records[1]])
    r = run(["-C", str(conf), "log", "0CCC"], tmp_path)
    assert (r.returncode, r.stderr) == (1, f"mailhub: no events for 0CCC in {events}\n")
    # by default the event log is DATA/events.jsonl
    (tmp_path / "default.toml").write_text("")
    r = run(["-C", str(tmp_path / "default.toml"), "log", "0AAA"], tmp_path)
    assert (r.returncode, r.stderr) == (1, f"mailhub: no events for 0AAA in {tmp_path / 'mailhub-data' / 'events.jsonl'}\n")
    (tmp_path / "none.toml").write_text('[server]\nevent_log = ""\n')
    r = run(["-C", str(tmp_path / "none.toml"), "log", "0AAA"], tmp_path)
    assert (r.returncode, r.stderr) == (
        64, "mailhub: no event log: set server.event_log in the configuration or use --file\n"
    )
    r = run(["-C", "nope.toml", "log", "0AAA"], tmp_path)
    assert (r.returncode, r.stderr) == (78, "mailhub: nope.toml: cannot read: No such file or directory\n")
    r = run(["log"], tmp_path)
    assert r.returncode == 64


def test_commands_import_only_what_they_need(tmp_path):
    # check-config and queue must not pay for bcrypt (user) or OpenSSL (make-cert)
    code = (
        "import sys; from mailhub.cli.main import main; "
        "rc = main(['check-config'], out=open('/dev/null', 'w')); "
        "print(rc, sorted(m for m in "
        "('bcrypt', 'OpenSSL', 'mailhub.smtp.sasl', 'mailhub.users', 'mailhub.tls', 'mailhub.cli.user') "
        "if m in sys.modules))"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("MAILHUB_CONFIG", None)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.stdout == "0 []\n", r.stderr


@pytest.mark.parametrize("args", [["--version"], ["user", "--version"], ["queue", "list", "--version"], ["log", "--version"]])
def test_version(capsys, args):
    """Every command's --version is mailhub's, not Twisted's (usage.Options' own)."""
    from mailhub import __version__

    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 0
    assert capsys.readouterr().out == f"mailhub {__version__}\n"
