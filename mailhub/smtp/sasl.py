"""
SMTP authentication exchanges (RFC 4954): the SASL PLAIN and LOGIN
mechanisms and the failed-login throttle.

Owns: the pure SASL PLAIN / LOGIN decoding of RFC 4616 /
draft-murchison-sasl-login as a small state machine (L{SASLExchange}), the
replies the server sends around AUTH (the C{REPLY_*} constants), and the
per-client counter of failed logins (L{AuthThrottle}).

Must not touch: the SMTP protocol and its I/O (L{mailhub.smtp.server} and
L{mailhub.smtp.tlsauth} send the replies), the users file and password
checks (L{mailhub.users}), the relay decision (L{mailhub.smtp.policy}),
configuration files.
"""

from __future__ import annotations

import binascii
from collections import deque

from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime

__all__ = [
    "SASLError",
    "SASLExchange",
    "MECHANISMS",
    "decode_plain",
    "decode_login",
    "LOGIN_USERNAME_PROMPT",
    "LOGIN_PASSWORD_PROMPT",
    "AuthThrottle",
    "REPLY_AUTH_OK",
    "REPLY_AUTH_FAILED",
    "REPLY_MALFORMED",
    "REPLY_CANCELLED",
    "REPLY_ALREADY_AUTHENTICATED",
    "REPLY_UNKNOWN_MECHANISM",
    "REPLY_AUTH_REQUIRED",
    "REPLY_ENCRYPTION_REQUIRED",
    "REPLY_TOO_MANY_FAILURES",
    "REPLY_TEMPORARY_FAILURE",
]

# ---------------------------------------------------------------------------
# Replies the server sends around AUTH (RFC 4954 section 6, RFC 3463/5248).
# (code, enhanced status, text); the server turns them into a
# L{mailhub.smtp.proto.Reply}.

REPLY_AUTH_OK = (235, "2.7.0", "Authentication successful")
REPLY_AUTH_FAILED = (535, "5.7.8", "Authentication credentials invalid")
REPLY_MALFORMED = (501, "5.5.2", "Cannot decode AUTH response")
REPLY_CANCELLED = (501, "5.7.0", "Authentication cancelled")
REPLY_ALREADY_AUTHENTICATED = (503, "5.5.1", "Already authenticated")
REPLY_UNKNOWN_MECHANISM = (504, "5.5.4", "Unrecognized authentication mechanism")
REPLY_AUTH_REQUIRED = (530, "5.7.0", "Authentication required")
REPLY_ENCRYPTION_REQUIRED = (538, "5.7.11", "Encryption required for requested authentication mechanism")
REPLY_TOO_MANY_FAILURES = (421, "4.7.0", "Too many failed authentication attempts, closing connection")
REPLY_TEMPORARY_FAILURE = (454, "4.7.0", "Temporary authentication failure")

#: Mechanisms offered, in EHLO order.  Both carry a clear-text password, so
#: they are offered only over TLS (or loopback, if allowed by config).
MECHANISMS = ("PLAIN", "LOGIN")

#: The 334 challenges of the LOGIN mechanism: base64 of "Username:" / "Password:".
LOGIN_USERNAME_PROMPT = b"VXNlcm5hbWU6"
LOGIN_PASSWORD_PROMPT = b"UGFzc3dvcmQ6"


# ---------------------------------------------------------------------------
# SASL (RFC 4954 AUTH; RFC 4616 PLAIN; draft-murchison-sasl-login LOGIN)


class SASLError(Exception):
    """
    An AUTH exchange failed before any password was checked.  C{reply} is
    the (code, enhanced, text) the server answers with.
    """

    def __init__(self, reply: tuple[int, str, str], detail: str = "") -> None:
        super().__init__(detail or reply[2])
        self.reply = reply
        self.code, self.enhanced, self.text = reply


def _b64decode(data: bytes) -> bytes:
    data = data.strip()
    if data == b"=":  # RFC 4954: "=" is an empty initial response
        return b""
    try:
        return binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError) as e:
        raise SASLError(REPLY_MALFORMED, f"invalid base64: {e}") from e


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SASLError(REPLY_MALFORMED, "not UTF-8") from e


def decode_plain(b64: bytes) -> tuple[str, str, str]:
    """
    Decode a PLAIN response (RFC 4616): base64 of
    C{authzid NUL authcid NUL password}.

    @return: (authzid, authcid, password); authzid is often empty.  The
        server must refuse (535 5.7.8) an authzid that is neither empty nor
        equal to authcid: mailhub does not do proxy authorization.
    @raise SASLError: with L{REPLY_MALFORMED} for bad base64, a wrong number
        of fields, an empty user name or password, or non-UTF-8 text.
    """
    raw = _b64decode(b64)
    parts = raw.split(b"\0")
    if len(parts) != 3:
        raise SASLError(REPLY_MALFORMED, "PLAIN response must have three NUL-separated fields")
    authzid, authcid, password = (_utf8(p) for p in parts)
    if not authcid or not password:
        raise SASLError(REPLY_MALFORMED, "empty user name or password")
    return authzid, authcid, password


def decode_login(b64: bytes) -> str:
    """Decode one LOGIN response (user name or password)."""
    text = _utf8(_b64decode(b64))
    if "\0" in text:
        raise SASLError(REPLY_MALFORMED, "NUL in LOGIN response")
    return text


class SASLExchange:
    """
    One AUTH exchange as a small state machine, so the server only moves
    lines around::

        try:
            ex = SASLExchange(mechanism, initial)  # initial: bytes after the
                                                   # mechanism name, or None
            step = ex.next()
            while isinstance(step, bytes):         # a challenge
                send(b"334 " + step)
                ex.feed(await_line())              # raises on "*"
                step = ex.next()
        except SASLError as e:
            reply(*e.reply)                        # 504 5.5.4 / 501 5.5.2 / 501 5.7.0
        else:
            checker.requestAvatarId(step)          # step is UsernamePassword
                                                   # (mailhub.users.UsersChecker)

    PLAIN without an initial response sends an empty challenge (C{334 }).
    A PLAIN authzid other than empty or the authcid yields credentials that
    can never match (proxy authorization is not offered), so it costs the
    client a failure like a wrong password.
    """

    def __init__(self, mechanism: str, initial: bytes | None = None) -> None:
        self.mechanism = mechanism.upper()
        if self.mechanism not in MECHANISMS:
            raise SASLError(REPLY_UNKNOWN_MECHANISM)
        self._pending: bytes | None = initial
        self._username: str | None = None
        self._done = False

    def feed(self, line: bytes) -> None:
        """The client's answer to the last challenge (without CRLF)."""
        if line.strip() == b"*":
            raise SASLError(REPLY_CANCELLED)
        self._pending = line

    def next(self) -> bytes | UsernamePassword:
        """The next challenge to send, or the credentials to check."""
        response, self._pending = self._pending, None
        if self.mechanism == "PLAIN":
            if response is None:
                return b""  # "334 " then the client sends the response
            authzid, authcid, password = decode_plain(response)
            if authzid and authzid != authcid:
                # Proxy authorization is not supported: fail like a bad password.
                return UsernamePassword(b"", b"")
            return UsernamePassword(authcid.encode("utf-8"), password.encode("utf-8"))
        # LOGIN
        if self._username is None:
            if response is None:
                return LOGIN_USERNAME_PROMPT
            username = decode_login(response)
            if not username:
                raise SASLError(REPLY_MALFORMED, "empty user name")
            self._username = username
            return LOGIN_PASSWORD_PROMPT
        if response is None:
            return LOGIN_PASSWORD_PROMPT
        password = decode_login(response)
        return UsernamePassword(self._username.encode("utf-8"), password.encode("utf-8"))


# ---------------------------------------------------------------------------
# Throttle


class AuthThrottle:
    """
    Slows down and then cuts off password guessing, per client IP.

    Every failed AUTH is answered only after C{delay} seconds (the server
    waits on the Deferred from L{failed}); once a client IP has
    C{max_failures} failures within C{window} seconds, L{failed} fires with
    C{True}: the server answers L{REPLY_TOO_MANY_FAILURES} (421 4.7.0) and
    closes, and L{blocked} stays true for that IP (new connections get 421
    at AUTH) until its failures age out of the window.  Successful logins
    do not clear the count, so one valid account cannot be used to reset
    guessing on others.

    Parallel connections: a password check takes a while (bcrypt in a
    thread), so counting failures only when they are known would let a
    client start any number of guesses at once before the first failure
    is recorded.  The server therefore reserves a slot with L{begin} before
    each check and gives it back with L{finish}: failures in the window
    plus checks in flight never exceed C{max_failures} per IP, so at most
    C{max_failures} wrong guesses per window are ever evaluated, whatever
    the concurrency.  A success gives its slot back without counting (as a
    sequential success does not count), but it never lifts the failures or
    the other slots, so it cannot raise that bound.
    """

    def __init__(
        self,
        clock: IReactorTime,
        delay: float = 1.0,
        max_failures: int = 5,
        window: float = 300.0,
        max_clients: int = 10000,
    ) -> None:
        self._clock = clock
        self.delay = delay
        self.max_failures = max_failures
        self.window = window
        self._max_clients = max_clients
        self._failures: dict[str, deque[float]] = {}
        self._in_flight: dict[str, int] = {}

    def _recent(self, client_ip: str) -> deque[float] | None:
        times = self._failures.get(client_ip)
        if times is None:
            return None
        horizon = self._clock.seconds() - self.window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[client_ip]
            return None
        return times

    def failures(self, client_ip: str) -> int:
        """Failures of C{client_ip} within the window."""
        times = self._recent(client_ip)
        return len(times) if times else 0

    def blocked(self, client_ip: str) -> bool:
        """Whether C{client_ip} must get 421 4.7.0 instead of another try."""
        return self.failures(client_ip) >= self.max_failures

    def in_flight(self, client_ip: str) -> int:
        """Checks of C{client_ip} started with L{begin} and not yet finished."""
        return self._in_flight.get(client_ip, 0)

    def begin(self, client_ip: str) -> bool:
        """
        Reserve a slot for one credential check of C{client_ip}, before the
        check starts.  C{False}: failures in the window plus checks in
        flight already reach C{max_failures}; the server answers
        L{REPLY_TOO_MANY_FAILURES} (421 4.7.0) and closes without checking.
        C{True}: check, then call L{finish} exactly once.
        """
        if self.failures(client_ip) + self.in_flight(client_ip) >= self.max_failures:
            return False
        self._in_flight[client_ip] = self.in_flight(client_ip) + 1
        return True

    def finish(self, client_ip: str, ok: bool) -> defer.Deferred[bool]:
        """
        Give back the slot of L{begin}.  C{ok}: the check did not reject
        the password (a success, or a checker error that revealed nothing):
        nothing is counted and the Deferred has already fired with
        C{False}.  Otherwise this is L{failed}: the failure is counted and
        the Deferred fires after C{delay} with whether to close.
        """
        count = self._in_flight.get(client_ip, 0) - 1
        if count > 0:
            self._in_flight[client_ip] = count
        else:
            self._in_flight.pop(client_ip, None)
        if ok:
            return defer.succeed(False)
        return self.failed(client_ip)

    def record_failure(self, client_ip: str) -> bool:
        """Count a failure now; returns whether the client is now blocked."""
        if len(self._failures) >= self._max_clients and client_ip not in self._failures:
            for ip in list(self._failures):
                self._recent(ip)
            if len(self._failures) >= self._max_clients:
                # Forget the client whose latest failure is oldest.
                oldest = min(self._failures, key=lambda ip: self._failures[ip][-1])
                del self._failures[oldest]
        self._recent(client_ip)
        self._failures.setdefault(client_ip, deque()).append(self._clock.seconds())
        return self.blocked(client_ip)

    def failed(self, client_ip: str) -> defer.Deferred[bool]:
        """
        Record a failure and return a Deferred that fires after C{delay}
        with whether to close (C{True}: 421 4.7.0 and close; C{False}:
        535 5.7.8).  Cancelling it (connection lost) stops the timer.
        """
        now_blocked = self.record_failure(client_ip)
        return task.deferLater(self._clock, self.delay, lambda: now_blocked)
