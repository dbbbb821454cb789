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
        assert "mailhub = mailhub.cli.main:main" in f.read()


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
    """The scheduler (spool recovery) starts before any listener."""
    from mailhub import tap
    from mailhub.scheduler import Scheduler

    o = tap_options(["--smtp", "tcp:0:interface=127.0.0.1", "--smtp", "tcp:0:interface=127.0.0.2"],
                    tmp_path, monkeypatch)
    top = tap.makeService(o)
    children = list(top)
    assert isinstance(children[0], tap._StartupLog)
    assert isinstance(children[1], Scheduler)
    listeners = children[2:]
    assert [l.description for l in listeners] == ["tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.2"]
    assert all(isinstance(l, tap._Listener) and not l.running for l in listeners)
    assert os.path.isdir(tmp_path / "mailhub-data" / "spool" / "envelopes")


def test_plugin_is_found_from_the_source_tree():
    r = subprocess.run(
        [sys.executable, "-c",
         "from twisted.plugin import getPlugins; from twisted.application.service import IServiceMaker;"
         "print(sorted(p.tapname for p in getPlugins(IServiceMaker) if p.tapname == 'mailhub'))"],
        cwd="/", env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=60,
    )
    assert r.stdout.strip() == "['mailhub']", r.stderr
