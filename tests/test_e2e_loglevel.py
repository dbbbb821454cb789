"""
End to end: the log level of the real daemon (C{server.log_level},
C{twistd mailhub --log-level}).  At the default (info) the log has the
mail lines but none of Twisted's factory and port chatter, through an
outbound relay delivery, an HTTP request and a stop; C{--log-level=warn}
keeps warnings and errors and nothing at info.
"""

from __future__ import annotations

import signal
import subprocess
import urllib.request

from daemon import _STARTED, CLEAN_EXIT, DOMAIN, Daemon, config_text, message, read_maildir, send, wait_for
from peers import Sink, free_port

NOISE = ("Starting factory", "Stopping factory", "starting on", "Port", "Closed)", "starting up", "reactor class")


def test_default_level_has_mail_lines_without_twisted_noise(tmp_path):
    sink = Sink(tmp_path / "sink", free_port())
    http = free_port()
    home = tmp_path / "a"
    home.mkdir()
    text = config_text(trusted='["127.0.0.0/8"]').replace(
        "[spool]", f'http = ["tcp:{http}:interface=127.0.0.1"]\n\n[spool]'
    ) + f'\n[relay.routes]\n"sink.test" = "[127.0.0.1]:{sink.port}"\n'
    d = Daemon(home, text).start()
    try:
        qid = send(d, "someone@sink.test", message("someone@sink.test", "<relay@client.test>"))
        wait_for(lambda: sink.dumps(), 30, "the relay delivery")
        wait_for(lambda: f"{qid}: removed" in d.log(), 30, "the queue entry to go")
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=20) as r:
            assert r.status == 200
    finally:
        assert d.stop() == CLEAN_EXIT
        sink.stop()
    log = d.log()
    assert f"{qid}: to=<someone@sink.test>" in log and "status=sent" in log  # mail lines at info
    assert "listening for SMTP" in log and "mailhub " in log
    for noise in NOISE:
        assert noise not in log, (noise, log)


def test_debug_level_shows_twisted_chatter(tmp_path):
    d = Daemon(tmp_path, args=("--log-level=debug",)).start()
    assert d.stop() == CLEAN_EXIT
    log = d.log()
    assert "starting on" in log and "Closed)" in log
    assert "Starting factory" not in log  # mailhub's factories are never noisy


def test_warn_level_hides_info_and_keeps_warnings(tmp_path):
    port = free_port()
    aliases = tmp_path / "aliases"
    aliases.write_text("listed: :include:relative/path\n")
    text = config_text(extra_local=f'aliases = "{aliases}"').replace(
        'smtp = ["tcp:0:interface=127.0.0.1"]', f'smtp = ["tcp:{port}:interface=127.0.0.1"]'
    )
    d = Daemon(tmp_path, text, args=("--log-level=warn",))
    # Daemon.start waits for the listening line, which is info: start it here
    # on a known port and wait until it accepts a message.
    d.port = port
    d.runs, d.log_path, d.err_path = 1, str(tmp_path / "daemon1.log"), str(tmp_path / "daemon1.err")
    d.proc = subprocess.Popen(
        d.command(*d.args), cwd=d.home, env=d.env(),
        stdout=open(d.log_path, "wb"), stderr=open(d.err_path, "wb"),
    )
    _STARTED.append(d.proc)
    try:
        def delivered():
            try:
                send(d, f"alice@{DOMAIN}", message(f"alice@{DOMAIN}", "<warn@client.test>"))
                return True
            except OSError:
                assert d.proc.poll() is None, d.stderr()
                return False

        wait_for(delivered, 30, "the daemon to accept a message")
        wait_for(lambda: read_maildir(d.maildir("alice")), 30, "the delivery")
        # a broken configuration on reload: an error line, the daemon keeps running
        with open(d.conf, "a") as f:
            f.write("\n[server]\nnonsense = 1\n")
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "[mailhub.daemon.reload#error]" in d.log(), 30, "the refused reload")
    finally:
        assert d.stop() == CLEAN_EXIT
    log = d.log()
    assert "#warn]" in log and ":include: path must be absolute" in log, log
    assert "#info]" not in log, log
    assert "listening for SMTP" not in log and "status=sent" not in log and "delivered" not in log
    for noise in NOISE:
        assert noise not in log, (noise, log)
