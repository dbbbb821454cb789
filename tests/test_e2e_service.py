"""
The daemon as a system service, end to end: SIGHUP (with and without
twistd's -n), a daemonized start that fails after the fork, and a reload
of the configuration file (SIGHUP and C{mailhub reload}).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from daemon import DOMAIN, ROOT, TWISTD, Daemon, config_text, delivered_with, message, send, wait_for
from peers import free_port


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("MAILHUB_CONFIG", None)
    return env


def _daemonized(home, *args: str) -> subprocess.CompletedProcess:
    """twistd without -n: returns when the launcher does."""
    return subprocess.run(
        [sys.executable, "-c", TWISTD, f"--pidfile={home}/twistd.pid", f"--logfile={home}/twistd.log",
         "mailhub", *(["--user=root"] if os.geteuid() == 0 else []), *args],
        cwd=str(home), env=_env(), capture_output=True, text=True, timeout=60,
    )


def _read(path) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not _alive(pid), 20, "the daemon to stop")


def test_daemonized_sighup_without_tls_reloads_and_survives(tmp_path):
    port = free_port()
    result = _daemonized(tmp_path, "--smtp", f"tcp:{port}:interface=127.0.0.1", "--data", str(tmp_path / "data"))
    assert result.returncode == 0, result.stderr
    pid = int(_read(tmp_path / "twistd.pid"))
    try:
        wait_for(lambda: "listening for SMTP" in _read(tmp_path / "twistd.log"), 20, "the daemon to listen")
        os.kill(pid, signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in _read(tmp_path / "twistd.log"), 20, "the reload line")
        assert _alive(pid)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            assert s.recv(100).startswith(b"220 ")
    finally:
        _stop(pid)
    assert not os.path.exists(tmp_path / "twistd.pid")


def test_foreground_sighup_without_tls_survives(tmp_path):
    d = Daemon(tmp_path).start()
    try:
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in d.log(), 20, "the reload line")
        assert d.proc.poll() is None
        send(d, f"alice@{DOMAIN}", message(f"alice@{DOMAIN}", "hup1"))
        delivered_with(d, "alice", "hup1")
    finally:
        d.stop()


def test_daemonized_start_with_port_in_use_fails_with_one_line(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        result = _daemonized(tmp_path, "--smtp", f"tcp:{port}:interface=127.0.0.1", "--data", str(tmp_path / "d"))
    finally:
        busy.close()
    line = f"mailhub: cannot listen on tcp:{port}:interface=127.0.0.1: Address already in use"
    assert result.returncode != 0
    assert result.stderr.splitlines()[0] == line
    assert line in _read(tmp_path / "twistd.log")
    assert "Traceback" not in _read(tmp_path / "twistd.log")
    assert not os.path.exists(tmp_path / "twistd.pid")


def test_daemonized_second_instance_on_same_spool_fails(tmp_path):
    first = Daemon(tmp_path).start()
    try:
        other = tmp_path / "second"
        other.mkdir()
        result = _daemonized(other, "--config", first.conf, "--smtp", f"tcp:{free_port()}:interface=127.0.0.1")
        assert result.returncode != 0
        first_line = result.stderr.splitlines()[0]
        assert first_line.startswith("mailhub: cannot listen on "), result.stderr
        assert "control.sock" in first_line
        assert first_line in _read(other / "twistd.log")
        assert first.proc.poll() is None
    finally:
        first.stop()


def _reload_cli(d: Daemon) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mailhub.cli.main", "--config", d.conf, "reload"],
        cwd=d.home, env=d.env(), capture_output=True, text=True, timeout=60,
    )


def test_reload_applies_users_and_routes_refuses_broken_and_keeps_sessions(tmp_path):
    sink_port = free_port()
    d = Daemon(tmp_path).start()
    try:
        # a session opened before the reload
        session = d.smtp()
        assert session.ehlo()[0] == 250
        assert session.mail("sender@client.test")[0] == 250
        # carol does not exist yet
        with d.smtp() as s:
            s.ehlo()
            s.mail("sender@client.test")
            assert s.rcpt(f"carol@{DOMAIN}")[0] == 550
        text = config_text().replace('users = ["alice", "bob"]', 'users = ["alice", "bob", "carol"]')
        text += f'routes = {{ "routed.test" = "[127.0.0.1]:{sink_port}" }}\n'
        with open(d.conf, "w") as f:
            f.write(text)
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded: local.users, relay.routes applied" in d.log(), 20, "reload")
        send(d, f"carol@{DOMAIN}", message(f"carol@{DOMAIN}", "carol1"))
        delivered_with(d, "carol", "carol1")
        # the session across the reload goes on, with the new users
        assert session.rcpt(f"carol@{DOMAIN}")[0] == 250
        assert session.data(message(f"carol@{DOMAIN}", "carol2"))[0] == 250
        session.quit()
        delivered_with(d, "carol", "carol2")

        # a broken file is refused; the running configuration stays
        with open(d.conf, "w") as f:
            f.write(text.replace("max_backoff = 2", "max_backoff = 'soon'"))
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused, keeping the running configuration" in d.log(), 20, "the refusal")
        assert "relay.max_backoff" in d.log().split("reload refused")[1].splitlines()[0]
        result = _reload_cli(d)
        assert result.returncode == 78
        assert result.stderr.startswith("mailhub: reload refused, the daemon keeps its configuration: ")
        # an aliases file only the daemon reads: the daemon refuses it
        with open(os.path.join(d.home, "aliases"), "w") as f:
            f.write("no colon on this line\n")
        with open(d.conf, "w") as f:
            f.write(text.replace('users = ["alice"', 'aliases = "aliases"\nusers = ["alice"'))
        result = _reload_cli(d)
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith("mailhub: reload refused, keeping the running configuration: ")
        assert "aliases:1" in result.stderr
        send(d, f"carol@{DOMAIN}", message(f"carol@{DOMAIN}", "carol3"))
        delivered_with(d, "carol", "carol3")

        # a listener change needs a restart
        with open(d.conf, "w") as f:
            f.write(text.replace('smtp = ["tcp:0:interface=127.0.0.1"]',
                                 f'smtp = ["tcp:{free_port()}:interface=127.0.0.1"]'))
        result = _reload_cli(d)
        assert result.returncode == 0, result.stderr
        assert "needs a restart: server.smtp" in result.stdout
        assert "needs a restart: server.smtp" in d.log()
    finally:
        d.stop()


def test_reload_cli_when_daemon_is_down(tmp_path):
    conf = tmp_path / "mailhub.toml"
    conf.write_text(config_text())
    result = subprocess.run(
        [sys.executable, "-m", "mailhub.cli.main", "--config", str(conf), "reload"],
        cwd=str(tmp_path), env=_env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 75
    assert result.stderr.startswith("mailhub: reload: mail system is down")
    assert len(result.stderr.splitlines()) == 1
