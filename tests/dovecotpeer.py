"""
A throwaway Dovecot for end-to-end tests (not a test file): LMTP on a
loopback port and a UNIX socket, IMAP on a loopback port, a passwd-file of
users (one with a tiny quota), Maildirs under a directory the test names.
Started with C{dovecot -c CONF}, stopped with C{dovecot -c CONF stop}.

Owns: the configuration, starting, stopping and logging in over IMAP.
Must not touch: what a test asserts.
"""

from __future__ import annotations

import imaplib
import os
import pwd
import signal
import socket
import subprocess

from peers import free_port, wait_for

__all__ = ["Dovecot", "PASSWORD", "mail_identity"]

PASSWORD = "wonderland"

CONF = """\
protocols = imap lmtp
listen = 127.0.0.1
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
info_log_path = {base}/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
mail_location = maildir:{mailboxes}/%d/%n
default_internal_user = {internal}
default_login_user = {login}
mail_plugins = $mail_plugins quota
quota_full_tempfail = {tempfail}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {base}/passwd
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {base}/passwd
  default_fields = uid={uid} gid={gid} home={base}/home/%d/%n
}}
plugin {{
  quota = maildir:User quota
}}
service lmtp {{
  unix_listener {base}/lmtp.sock {{
    mode = 0666
  }}
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {lmtp_port}
  }}
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
"""


def mail_identity() -> tuple[int, int, str, str]:
    """(uid, gid, internal user, login user): Dovecot serves no mail as uid 0, so root hands it to nobody."""
    if os.getuid() == 0:
        nobody = pwd.getpwnam("nobody")
        names = {p.pw_name for p in pwd.getpwall()}
        internal = "dovecot" if "dovecot" in names else "nobody"
        login = "dovenull" if "dovenull" in names else "nobody"
        return nobody.pw_uid, nobody.pw_gid, internal, login
    me = pwd.getpwuid(os.getuid()).pw_name
    return os.getuid(), os.getgid(), me, me


class Dovecot:
    """
    @param base: a directory of its own (configuration, sockets, log).
    @param users: address -> quota in bytes (0: none).
    @param tempfail: C{quota_full_tempfail}: 452 (yes) or 552 (no) over quota.
    """

    def __init__(self, binary: str, base: str, mailboxes: str, users: dict[str, int], tempfail: bool = True) -> None:
        self.binary = binary
        self.base = base
        self.mailboxes = mailboxes
        os.makedirs(base, exist_ok=True)
        os.makedirs(mailboxes, exist_ok=True)
        self.conf = os.path.join(base, "dovecot.conf")
        self.socket = os.path.join(base, "lmtp.sock")
        self.lmtp_port = free_port()
        self.imap_port = free_port()
        uid, gid, internal, login = mail_identity()
        if os.getuid() == 0:
            os.chown(mailboxes, uid, gid)
            os.chmod(base, 0o755)
        with open(os.path.join(base, "passwd"), "w") as f:
            for user, quota in users.items():
                extra = f"userdb_quota_rule=*:storage={quota}B" if quota else ""
                f.write(f"{user}:{{PLAIN}}{PASSWORD}::::::{extra}\n")
        os.chmod(os.path.join(base, "passwd"), 0o644)
        with open(self.conf, "w") as f:
            f.write(CONF.format(
                base=base, mailboxes=mailboxes, internal=internal, login=login, uid=uid, gid=gid,
                tempfail="yes" if tempfail else "no", lmtp_port=self.lmtp_port, imap_port=self.imap_port,
            ))
        self.started = False

    def start(self) -> Dovecot:
        subprocess.run([self.binary, "-c", self.conf], check=True, timeout=30)
        self.started = True

        def listening() -> bool:
            for port in (self.lmtp_port, self.imap_port):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except OSError:
                    return False
            return os.path.exists(self.socket)

        try:
            wait_for(listening, 15, "dovecot's listeners", interval=0.05)
        except AssertionError:
            raise AssertionError("dovecot did not listen: " + self.log()) from None
        return self

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        pidfile = os.path.join(self.base, "run", "master.pid")
        pid = int(open(pidfile).read()) if os.path.exists(pidfile) else None
        subprocess.run([self.binary, "-c", self.conf, "stop"], timeout=30, capture_output=True)
        if pid is None:
            return

        def gone() -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        try:
            wait_for(gone, 10, "dovecot to exit", interval=0.05)
        except AssertionError:
            os.kill(pid, signal.SIGKILL)

    def log(self) -> str:
        path = os.path.join(self.base, "dovecot.log")
        return open(path).read() if os.path.exists(path) else "(no log)"

    def imap(self, user: str) -> imaplib.IMAP4:
        """Logged in as C{user} (retried while Dovecot's auth process starts)."""
        imap = imaplib.IMAP4("127.0.0.1", self.imap_port)

        def logged_in() -> bool:
            try:
                return imap.login(user, PASSWORD)[0] == "OK"
            except imaplib.IMAP4.error as e:
                if "UNAVAILABLE" not in str(e):
                    raise
                return False

        wait_for(logged_in, 20, f"dovecot to log {user} in", interval=0.2)
        return imap

    def messages(self, user: str) -> list[bytes]:
        """Every message in C{user}'s INBOX, over IMAP."""
        imap = self.imap(user)
        try:
            typ, data = imap.select("INBOX", readonly=True)
            assert typ == "OK", data
            count = int(data[0])
            out = []
            for n in range(1, count + 1):
                typ, data = imap.fetch(str(n), "(BODY.PEEK[])")
                assert typ == "OK", data
                out.append(data[0][1])
            return out
        finally:
            imap.logout()
