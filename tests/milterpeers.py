"""
Real milters for end-to-end tests, started on 127.0.0.1 (or a Unix
socket) in a temporary directory: OpenDKIM (signing or verifying) and
rspamd's proxy worker in milter mode.  A helper module, not a test file.

Owns: their configuration files and processes.  Must not touch: mailhub
(tests/daemon.py) or what a test asserts.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess

from conftest import require_tool
from peers import free_port, wait_for

__all__ = ["OpenDKIM", "Rspamd", "dkim_key"]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def dkim_key(home: str, domain: str, selector: str = "sel") -> tuple[str, str]:
    """A fresh key pair by opendkim-genkey: (private key path, the TXT record's text)."""
    subprocess.run([require_tool("opendkim-genkey"), "-D", home, "-d", domain, "-s", selector], check=True)
    with open(os.path.join(home, f"{selector}.txt")) as f:
        zone = f.read()
    parts = zone[zone.index("(") + 1 : zone.index(")")]
    record = "".join(p.strip().strip('"') for p in parts.split('"') if p.strip() and p.strip() != '"')
    return os.path.join(home, f"{selector}.private"), record.replace(" ", "")


class OpenDKIM:
    """opendkim -f with its own configuration: C{mode} "s" (sign) or "v" (verify)."""

    def __init__(self, home: str, mode: str, domain: str, key: str = "", record: str = "",
                 unix: bool = False, authserv_id: str = "") -> None:
        self.home = home
        os.makedirs(home, exist_ok=True)
        self.port = 0 if unix else free_port()
        self.path = os.path.join(home, "opendkim.sock")
        self.socket = f"unix:{self.path}" if unix else f"inet:127.0.0.1:{self.port}"
        lines = [
            "Syslog no", "LogWhy yes", f"Mode {mode}", f"Domain {domain}", "Selector sel",
            "RequireSafeKeys false", "Canonicalization relaxed/relaxed", "On-BadSignature accept",
            f"Socket {'local:' + self.path if unix else f'inet:{self.port}@127.0.0.1'}",
            f"PidFile {os.path.join(home, 'opendkim.pid')}",
        ]
        if key:
            lines.append(f"KeyFile {key}")
        if record:
            keys = os.path.join(home, "keys")
            with open(keys, "w") as f:
                f.write(f"sel._domainkey.{domain} {record}\n")
            lines.append(f"TestPublicKeys {keys}")
        if authserv_id:
            lines.append(f"AuthservID {authserv_id}")
        if mode == "v":
            # loopback is "internal" (signed, not verified) by default: verify everything here
            lines += ["InternalHosts 192.0.2.1", "AlwaysAddARHeader yes"]
        self.conf = os.path.join(home, "opendkim.conf")
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> OpenDKIM:
        self.log = open(os.path.join(self.home, "opendkim.log"), "ab")
        self.proc = subprocess.Popen([require_tool("opendkim"), "-f", "-l", "-x", self.conf],
                                     stdout=self.log, stderr=self.log)
        if self.port:
            wait_for(lambda: self._alive() and _listening(self.port), 20, "opendkim to listen")
        else:
            wait_for(lambda: self._alive() and os.path.exists(self.path), 20, "opendkim's socket")
        return self

    def _alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            with open(os.path.join(self.home, "opendkim.log"), "rb") as f:
                raise AssertionError(f"opendkim exited: {f.read()[-2000:]!r}")
        return True

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
        if os.path.exists(self.path):
            os.unlink(self.path)


class Rspamd:
    """
    rspamd with the stock configuration and local overrides in C{home}:
    the proxy worker in milter mode (scanning itself; with C{quarantine},
    what it would reject is quarantined instead), the other workers
    on free loopback ports, DNS pointed at a closed loopback port (nothing
    leaves the machine), no Redis, headers added for local clients too.
    """

    def __init__(self, home: str, quarantine: bool = False) -> None:
        self.home = home
        self.port = free_port()
        for sub in ("local.d", "override.d", "db", "run"):
            os.makedirs(os.path.join(home, sub), exist_ok=True)
        dns_port = free_port()
        files = {
            "override.d/worker-proxy.inc": (
                f'bind_socket = "127.0.0.1:{self.port}";\nmilter = yes;\ntimeout = 120s;\n'
                'upstream "local" { default = yes; self_scan = yes; }\ncount = 1;\n'
                + ("quarantine_on_reject = true;\n" if quarantine else "")
            ),
            "override.d/worker-normal.inc": f'bind_socket = "127.0.0.1:{free_port()}";\ncount = 1;\n',
            "override.d/worker-controller.inc": f'bind_socket = "127.0.0.1:{free_port()}";\ncount = 1;\n',
            "override.d/logging.inc": f'type = "file";\nfilename = "{home}/rspamd.log";\nlevel = "info";\n',
            "local.d/options.inc": (
                f'dns {{ nameserver = ["127.0.0.1:{dns_port}"]; timeout = 0.2s; retransmits = 1; }}\n'
                "disable_monitoring = true;\n"
            ),
            "local.d/milter_headers.conf": (
                'use = ["x-spamd-result", "x-spam-status"];\nskip_local = false;\nskip_authenticated = false;\n'
            ),
        }
        for module in ("fuzzy_check", "rbl", "emails", "asn", "url_redirector", "phishing"):
            files[f"local.d/{module}.conf"] = "enabled = false;\n"
        for name, text in files.items():
            with open(os.path.join(home, name), "w") as f:
                f.write(text)
        self.socket = f"inet:127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Rspamd:
        user = ["-u", "root", "-g", "root"] if os.geteuid() == 0 else []
        self.out = open(os.path.join(self.home, "rspamd.out"), "ab")
        self.proc = subprocess.Popen(
            [require_tool("rspamd"), "-f", "-i", *user, "-c", "/etc/rspamd/rspamd.conf",
             f"--var=LOCAL_CONFDIR={self.home}", f"--var=DBDIR={self.home}/db",
             f"--var=RUNDIR={self.home}/run", f"--var=LOGDIR={self.home}"],
            stdout=self.out, stderr=self.out,
        )

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"rspamd exited with {self.proc.returncode}")
            return _listening(self.port)

        wait_for(up, 120, "rspamd's proxy worker to listen")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
