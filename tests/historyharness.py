"""
Helpers of the history tests (test_history_api.py, test_e2e_history.py,
test_e2e_history_postgres.py): a daemon with an HTTP listener and the
history on, the C{mailhub} command against it, headless Chromium's
arguments, and a check of JSON answers against docs/openapi.json.  A
helper module, not a test file.

Owns: nothing the tests assert.  Must not touch: the daemon's files.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request

from daemon import DOMAIN, Daemon, wait_for
from httpharness import conforms, openapi

__all__ = [
    "CONFIG", "HttpDaemon", "mailhub", "chromium_args", "openapi", "conforms", "make_token", "refused",
    "history_json",
]

_HTTP = re.compile(r"listening for HTTP on tcp:0:interface=127\.0\.0\.1 \(127\.0\.0\.1:(\d+)\)")


def mailhub(d: Daemon, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """The C{mailhub} console script against the daemon's configuration."""
    return subprocess.run(
        [sys.executable, "-m", "mailhub.cli.main", "--config", d.conf, *args],
        cwd=d.home, env=d.env(), input=stdin, capture_output=True, text=True, timeout=60,
    )


class HttpDaemon(Daemon):
    http_port = 0

    def start(self) -> HttpDaemon:
        super().start()
        m = wait_for(lambda: _HTTP.search(self.log()), 10, "the HTTP listener")
        self.http_port = int(m.group(1))
        return self

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """(status, headers, body) of one HTTP request; error statuses are returned, not raised."""
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method, headers=headers or {}
        )
        try:
            with urllib.request.urlopen(req, timeout=20) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()


def chromium_args(profile: str) -> list[str]:
    return [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}",
    ]


CONFIG = f"""
[server]
hostname = "mx.{DOMAIN}"
smtp = ["tcp:0:interface=127.0.0.1"]
trusted_networks = []
http = ["tcp:0:interface=127.0.0.1"]
http_admins = ["admin@{DOMAIN}"]

[spool]
path = "spool"

[local]
domains = ["{DOMAIN}"]
mailboxes = "mailboxes"
users = ["alice", "bob"]

[auth]
users = "users"

[relay]
min_backoff = 1
max_backoff = 2

[history]
database = "history.sqlite"
interval = 0.2
"""


def make_token(d: HttpDaemon, user: str) -> str:
    r = mailhub(d, "user", "add", user, "--password-stdin", stdin="correct horse\n")
    assert r.returncode == 0, r.stderr
    r = mailhub(d, "user", "token", user)
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    wait_for(lambda: d.request("GET", "/v1/queue", headers={"Authorization": f"Bearer {token}"})[0] != 401,
             10, "the daemon to see the new token")
    return token


def refused(d: Daemon, rcpt: str) -> int:
    """One transaction whose only recipient is refused; the RCPT reply code."""
    with d.smtp() as s:
        s.ehlo()
        s.mail("sender@client.test")
        code, _ = s.rcpt(rcpt)
        s.rset()
    return code


def history_json(d: Daemon, *args: str) -> list[dict]:
    r = mailhub(d, "history", "--json", *args)
    if r.returncode == 1:
        return []
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]
