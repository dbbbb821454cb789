"""
The in-memory SMTP harness with STARTTLS and AUTH switched on (not a test
file): the tests of mailhub.smtp.tlsauth, of the STARTTLS deadlines, of the
session statistics and of the metrics drive the server through it.

Owns: L{TLSAuthHarness} (the L{smtpharness.Harness} with FakeTLS and a real
UsersFile -- bcrypt with 4 rounds, checked synchronously -- on by default),
the account it holds (USER, PASSWORD, PLAIN), the EHLO reply for each
combination of STARTTLS and AUTH offered, and the two replies every
STARTTLS/AUTH transcript passes through (READY, AUTH_OK).
Must not hold assertions about the server beyond those shared steps
(greeting, STARTTLS started, EHLO after it, AUTH PLAIN accepted): the
expected replies of each behaviour stay in the test files.
"""

from __future__ import annotations

import base64

from smtpharness import FOREIGN, GREETING, HOST, TLS_OPTIONS, Client, FakeTLS, Harness, TLSStringTransport
from twisted.internet import defer

from mailhub.smtp import sasl as auth
from mailhub.users import UsersChecker, UsersFile

__all__ = ["USER", "PASSWORD", "PLAIN", "READY", "AUTH_OK", "TLSAuthHarness", "b64", "ehlo_reply"]

USER, PASSWORD = "alice@example.com", "s3cret-Pa55"

READY = "220 2.0.0 Ready to start TLS\r\n"
AUTH_OK = "235 2.7.0 Authentication successful\r\n"


def ehlo_reply(starttls: bool = False, auth_: bool = False) -> str:
    """The server's EHLO reply, with STARTTLS and AUTH PLAIN LOGIN offered or not."""
    lines = [HOST, "PIPELINING", "SIZE 10240000"]
    lines += ["STARTTLS"] if starttls else []
    lines += ["AUTH PLAIN LOGIN"] if auth_ else []
    lines += ["8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8", "CHUNKING", "DSN"]
    return "".join(f"250-{x}\r\n" for x in lines[:-1]) + f"250 {lines[-1]}\r\n"


def b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


PLAIN = b64(f"\0{USER}\0{PASSWORD}")


class TLSAuthHarness(Harness):
    """
    TLS (FakeTLS) and users (bcrypt, 4 rounds, checked synchronously) on by
    default; connect() hands out TLSStringTransports and checks the greeting.
    """

    def __init__(self, tmp_path, listener: str = "smtp", tls: bool = True, users: bool = True,
                 trusted=("127.0.0.0/8", "::1/128"), **factory_kw) -> None:
        super().__init__(tmp_path, trusted_networks=tuple(trusted))
        self.users = None
        kw: dict = {}
        if users:
            self.users = UsersFile(str(tmp_path / "users"), clock=self.clock, rounds=4)
            self.users.add(USER, PASSWORD, ["senders=sales@example.org"])
            self.users.add("bob@example.com", "bobs-password")
            kw["users"] = self.users
            kw["checker"] = UsersChecker(self.users, run=lambda f, *a: defer.maybeDeferred(f, *a))
            kw["throttle"] = auth.AuthThrottle(self.clock, delay=1.0, max_failures=3, window=300)
        if tls:
            kw["tls"] = FakeTLS()
        kw.update(factory_kw)
        self.serve(listener, **kw)

    def connect(self, ip: str = FOREIGN, transport_class=TLSStringTransport) -> Client:
        c = Client(self.factory, ip, transport_class)
        assert c.greeting == GREETING
        return c

    def tls_session(self, ip: str = FOREIGN) -> Client:
        """Connected, EHLO, STARTTLS done, EHLO again: ready for AUTH."""
        c = self.connect(ip)
        assert c.send("EHLO client.test\r\n") == ehlo_reply(starttls=True, auth_=c.proto.tlsauth.auth_offered())
        assert c.send("STARTTLS\r\n") == READY
        assert c.transport.tls_started == [TLS_OPTIONS]
        assert c.send("EHLO client.test\r\n") == ehlo_reply(auth_=self.users is not None)
        return c

    def authenticated(self, ip: str = FOREIGN) -> Client:
        c = self.tls_session(ip)
        assert c.send(f"AUTH PLAIN {PLAIN}\r\n") == AUTH_OK
        assert c.user == USER
        return c
