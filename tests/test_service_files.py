"""
The files an administrator installs from etc/: the example configuration
passes check-config, the systemd unit passes systemd-analyze verify, the
logrotate snippet passes logrotate -d and sends SIGHUP after rotating.
"""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import require_tool

from mailhub.cli.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ETC = os.path.join(ROOT, "etc")


def _read(name: str) -> str:
    with open(os.path.join(ETC, name)) as f:
        return f.read()


def _rooted(text: str, root) -> str:
    """The file with /etc/ and /var/ paths moved under C{root}."""
    return text.replace('"/etc/', f'"{root}/etc/').replace('"/var/', f'"{root}/var/')


def test_example_configuration_passes_check_config(tmp_path, capsys):
    for sub in ("etc/mailhub/tls", "var/lib/mailhub", "var/log/mailhub"):
        (tmp_path / sub).mkdir(parents=True)
    tls = tmp_path / "etc/mailhub/tls"
    assert main(["make-cert", "--hostname", "mx.example.org",
                 "--cert", str(tls / "cert.pem"), "--key", str(tls / "key.pem")]) == 0
    (tmp_path / "etc/mailhub/aliases").write_text("")
    (tmp_path / "etc/mailhub/users").write_text("")
    conf = tmp_path / "mailhub.toml"
    conf.write_text(_rooted(_read("mailhub.toml"), tmp_path))
    capsys.readouterr()
    assert main(["--config", str(conf), "check-config"]) == 0
    out = capsys.readouterr().out
    assert 'submission = ["tcp:587"]' in out
    assert 'domains = ["example.org", "mail.example.org"]' in out


def test_systemd_unit_verifies(tmp_path):
    analyze = require_tool("systemd-analyze")
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    unit = tmp_path / "mailhub.service"
    text = _read("mailhub.service")
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text
    assert "--nodaemon --pidfile=" in text
    unit.write_text(text.replace("/usr/bin/twistd", twistd))
    result = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


def test_logrotate_snippet(tmp_path):
    logrotate = require_tool("logrotate")
    logs = tmp_path / "var/log/mailhub"
    logs.mkdir(parents=True)
    (logs / "mail.log").write_text("a line\n")
    snippet = tmp_path / "mailhub"
    snippet.write_text(_read("logrotate").replace("/var/log/mailhub", str(logs)))
    result = subprocess.run(
        [logrotate, "-d", "-f", "-s", str(tmp_path / "state"), str(snippet)],
        capture_output=True, text=True, timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "error:" not in output
    assert f"renaming {logs}/mail.log to {logs}/mail.log.1" in output
    assert "running postrotate script" in output
    assert "--signal=HUP" in output
