"""
SMTP authentication: the users file, password checking, SASL decoding,
sender ownership and the failed-login throttle.

Owns: the users file named by C{auth.users} (reading it, reloading it when
it changes, rewriting it atomically for C{mailhub user}), the bcrypt
password check (as a L{twisted.cred} checker, run off the reactor thread),
the pure SASL PLAIN / LOGIN decoding of RFC 4616 / draft-murchison-sasl-login,
the C{submission.sender_check = "strict"} rule, and the per-client counter
of failed logins.

Must not touch: the SMTP protocol and its replies (smtpd.py sends them; the
codes it must use are the C{REPLY_*} constants below), the relay decision
(policy.py), configuration files.

Users file format (one user per line, readable with C{cat})::

    # comment; blank lines are ignored
    alice@example.com:$2b$12$<53 characters of bcrypt salt+hash>
    bob@example.com:$2b$12$...:senders=bob@example.org,postmaster@example.com

Fields are separated by C{:}.  The first is the address (normalised: domain
in lower case IDNA A-labels, local part folded to lower case as the mailbox
directory does), the second a bcrypt hash, and any further fields are
C{name=value} extensions.  Known: C{senders=} (comma-separated extra
envelope senders the user may use) and C{token=sha256-HEX} (an API token
of the HTTP interface, see L{UsersFile.add_token}; repeatable).  Unknown extensions (e.g. API token
hashes added by a later version) are kept untouched when the file is
rewritten.  Addresses may therefore not contain C{:}, white space or
quotes.
"""

from __future__ import annotations

import binascii
import fcntl
import hashlib
import hmac
import os
import secrets
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

import bcrypt
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from mailhub.address import AddressError, parse_mailbox

__all__ = [
    "UsersFile",
    "UserEntry",
    "UsersFileError",
    "UnknownUser",
    "UserExists",
    "normalize_user",
    "hash_password",
    "hash_token",
    "check_password_acceptable",
    "UsersChecker",
    "owns_sender",
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
    "REPLY_SENDER_NOT_OWNED",
    "REPLY_TEMPORARY_FAILURE",
]

log = Logger()

# ---------------------------------------------------------------------------
# Replies the server sends around AUTH (RFC 4954 section 6, RFC 3463/5248).
# (code, enhanced status, text); smtpd.py turns them into its Reply type.

REPLY_AUTH_OK = (235, "2.7.0", "Authentication successful")
REPLY_AUTH_FAILED = (535, "5.7.8", "Authentication credentials invalid")
REPLY_MALFORMED = (501, "5.5.2", "Cannot decode AUTH response")
REPLY_CANCELLED = (501, "5.7.0", "Authentication cancelled")
REPLY_ALREADY_AUTHENTICATED = (503, "5.5.1", "Already authenticated")
REPLY_UNKNOWN_MECHANISM = (504, "5.5.4", "Unrecognized authentication mechanism")
REPLY_AUTH_REQUIRED = (530, "5.7.0", "Authentication required")
REPLY_ENCRYPTION_REQUIRED = (538, "5.7.11", "Encryption required for requested authentication mechanism")
REPLY_TOO_MANY_FAILURES = (421, "4.7.0", "Too many failed authentication attempts, closing connection")
REPLY_SENDER_NOT_OWNED = (553, "5.7.1", "Sender address not owned by authenticated user")
REPLY_TEMPORARY_FAILURE = (454, "4.7.0", "Temporary authentication failure")

#: Mechanisms offered, in EHLO order.  Both carry a clear-text password, so
#: they are offered only over TLS (or loopback, if allowed by config).
MECHANISMS = ("PLAIN", "LOGIN")

#: The 334 challenges of the LOGIN mechanism: base64 of "Username:" / "Password:".
LOGIN_USERNAME_PROMPT = b"VXNlcm5hbWU6"
LOGIN_PASSWORD_PROMPT = b"UGFzc3dvcmQ6"

#: bcrypt uses at most 72 bytes of a password (bcrypt >= 5 refuses longer ones).
MAX_PASSWORD_BYTES = 72
DEFAULT_ROUNDS = 12


class UsersFileError(Exception):
    """A users-file operation failed; C{str()} is a message for the admin."""


class UnknownUser(UsersFileError):
    """C{passwd} / C{del} of an address that is not in the file."""


class UserExists(UsersFileError):
    """C{add} of an address that is already in the file."""


def normalize_user(address: str) -> str:
    """
    The form of a user name used as key and avatar id: C{local@domain} with
    the local part folded to lower case and the domain in lower case IDNA
    A-labels.  Login names are normalised the same way, so C{Alice@Example.COM}
    logs in as C{alice@example.com}.

    @raise ValueError: (L{AddressError}) if C{address} is not a plain
        C{local@domain} usable in the users file.
    """
    if any(c in address for c in ':"\\') or any(c.isspace() for c in address):
        raise AddressError(f"invalid user address: {address!r}")
    mailbox = parse_mailbox(address)
    return f"{mailbox.local_key}@{mailbox.domain_key}"


def check_password_acceptable(password: str) -> bytes:
    """
    The UTF-8 bytes of a new password.

    @raise ValueError: for an empty password, one with NUL or line breaks
        (SASL PLAIN cannot carry NUL), or one over 72 bytes (bcrypt's limit).
    """
    if not password:
        raise ValueError("empty password refused")
    if any(c in password for c in "\0\r\n"):
        raise ValueError("password must not contain NUL or line breaks")
    data = password.encode("utf-8")
    if len(data) > MAX_PASSWORD_BYTES:
        raise ValueError(f"password longer than {MAX_PASSWORD_BYTES} bytes (bcrypt limit)")
    return data


def hash_password(password: str, rounds: int = DEFAULT_ROUNDS) -> str:
    """A bcrypt hash (C{$2b$...}) of an acceptable password."""
    return bcrypt.hashpw(check_password_acceptable(password), bcrypt.gensalt(rounds)).decode("ascii")


def _check_hash(password: bytes, hashed: str) -> bool:
    """bcrypt.checkpw that answers False instead of raising."""
    if len(password) > MAX_PASSWORD_BYTES:
        return False
    try:
        return bcrypt.checkpw(password, hashed.encode("ascii"))
    except (ValueError, UnicodeError):
        return False


# A valid hash of a random password: checked for unknown users so that a
# failed login takes as long whether or not the user exists.
_DUMMY_HASH = bcrypt.hashpw(os.urandom(16).hex().encode(), bcrypt.gensalt(DEFAULT_ROUNDS)).decode()


@dataclass(frozen=True)
class UserEntry:
    """One line of the users file."""

    address: str
    password_hash: str
    extensions: tuple[str, ...] = ()

    @property
    def senders(self) -> tuple[str, ...]:
        """Extra envelope senders from the C{senders=} extension."""
        out: list[str] = []
        for ext in self.extensions:
            name, _, value = ext.partition("=")
            if name == "senders":
                out.extend(s.strip() for s in value.split(",") if s.strip())
        return tuple(out)

    @property
    def token_hashes(self) -> tuple[str, ...]:
        """API token hashes (C{token=sha256-HEX} extensions; see L{UsersFile.add_token})."""
        return tuple(ext[len("token="):] for ext in self.extensions if ext.startswith("token="))

    def to_line(self) -> str:
        return ":".join((self.address, self.password_hash) + self.extensions)


def hash_token(token: str) -> str:
    """
    The stored form of an API token: C{sha256-HEX} (no C{:}, the field separator).  Tokens are 256 random
    bits, so a fast unsalted hash is enough (nothing to brute-force) and a
    lookup costs one hash, not one bcrypt per user.
    """
    return "sha256-" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def _parse_line(line: str) -> UserEntry | None:
    """C{None} for a blank or comment line; raises ValueError if malformed."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    fields = text.split(":")
    if len(fields) < 2:
        raise ValueError("expected address:bcrypt-hash")
    address = normalize_user(fields[0])
    hashed = fields[1]
    if not hashed.startswith(("$2a$", "$2b$", "$2y$")):
        raise ValueError("password hash is not a bcrypt hash ($2b$...)")
    return UserEntry(address, hashed, tuple(fields[2:]))


class _WallClock:
    def seconds(self) -> float:
        return time.time()


class UsersFile:
    """
    The users file: lookups for the server, edits for C{mailhub user}.

    Lookups re-read the file when its inode, size or mtime changed, checked
    at most once per C{check_interval} seconds of C{clock}, so a running
    daemon sees C{mailhub user add} without a restart or signal.  A missing
    file means no users.  Malformed lines are logged (with their line
    number) and ignored; the other users keep working.

    Edits (L{add}, L{set_password}, L{remove}) hold an exclusive C{flock}
    on C{PATH.lock}, re-read the file, and replace it atomically (temporary
    file, fsync, rename, mode 0600), keeping comments and unknown lines.
    """

    def __init__(
        self,
        path: str,
        clock: IReactorTime | None = None,
        check_interval: float = 1.0,
        rounds: int = DEFAULT_ROUNDS,
    ) -> None:
        self.path = path
        self._clock = clock if clock is not None else _WallClock()
        self._check_interval = check_interval
        self.rounds = rounds
        self._users: dict[str, UserEntry] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at: float | None = None
        self._loaded = False

    # -- reading -----------------------------------------------------------

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _refresh(self) -> None:
        now = self._clock.seconds()
        if self._checked_at is not None and now - self._checked_at < self._check_interval:
            return
        self._checked_at = now
        try:
            stamp = self._stat()
        except OSError as e:
            log.error("users file {path}: {error}", path=self.path, error=str(e))
            return
        if self._loaded and stamp == self._stamp:
            return
        try:
            lines = self._read_lines()
        except OSError as e:
            # Keep what we had: an unreadable file is an admin mistake, not
            # a reason to lock every user out.
            log.error("users file {path}: cannot read: {error}", path=self.path, error=str(e))
            return
        self._users = self._parse(lines, warn=True)
        self._stamp = stamp
        self._loaded = True
        log.info("users file {path}: {count} users", path=self.path, count=len(self._users))

    def _read_lines(self) -> list[str]:
        try:
            with open(self.path, encoding="utf-8") as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    def _parse(self, lines: list[str], warn: bool) -> dict[str, UserEntry]:
        users: dict[str, UserEntry] = {}
        for number, line in enumerate(lines, 1):
            try:
                entry = _parse_line(line)
            except ValueError as e:
                if warn:
                    log.error(
                        "users file {path}, line {line}: {error}; line ignored",
                        path=self.path,
                        line=number,
                        error=str(e),
                    )
                continue
            if entry is not None:
                if entry.address in users and warn:
                    log.warn(
                        "users file {path}, line {line}: duplicate user {address}; first one used",
                        path=self.path,
                        line=number,
                        address=entry.address,
                    )
                users.setdefault(entry.address, entry)
        return users

    def get(self, address: str) -> UserEntry | None:
        """The entry for C{address} (any case), or C{None}."""
        self._refresh()
        try:
            key = normalize_user(address)
        except ValueError:
            return None
        return self._users.get(key)

    def __contains__(self, address: str) -> bool:
        return self.get(address) is not None

    def addresses(self) -> list[str]:
        """All user addresses, sorted."""
        self._refresh()
        return sorted(self._users)

    def may_send_as(self, user: str, sender: str, separator: str = "+") -> bool:
        """L{owns_sender} with the user's C{senders=} extension."""
        entry = self.get(user)
        extra = entry.senders if entry is not None else ()
        return owns_sender(user, sender, extra=extra, separator=separator)

    # -- editing -----------------------------------------------------------

    def add(self, address: str, password: str, extensions: Iterable[str] = ()) -> str:
        """
        Add a user; returns the normalised address.

        @raise UserExists: if the address is already there.
        @raise ValueError: for an invalid address or password.
        @raise UsersFileError: if the file cannot be written.
        """
        key = normalize_user(address)
        hashed = hash_password(password, self.rounds)

        def edit(lines: list[str], users: dict[str, UserEntry]) -> list[str]:
            if key in users:
                raise UserExists(f"user exists: {key}")
            return lines + [UserEntry(key, hashed, tuple(extensions)).to_line()]

        self._edit(edit)
        return key

    def set_password(self, address: str, password: str) -> str:
        """
        Replace a user's password hash, keeping its extensions.

        @raise UnknownUser: if the address is not in the file.
        """
        key = normalize_user(address)
        hashed = hash_password(password, self.rounds)

        def edit(lines: list[str], users: dict[str, UserEntry]) -> list[str]:
            return self._replace_entry(lines, key, lambda e: replace(e, password_hash=hashed))

        self._edit(edit)
        return key

    def remove(self, address: str) -> str:
        """
        Delete a user.

        @raise UnknownUser: if the address is not in the file.
        """
        key = normalize_user(address)

        def edit(lines: list[str], users: dict[str, UserEntry]) -> list[str]:
            return self._replace_entry(lines, key, lambda e: None)

        self._edit(edit)
        return key

    def add_token(self, address: str) -> str:
        """
        Create an API token for the HTTP interface and return it; only its
        hash (L{hash_token}) is stored, so this is the one time it is seen.
        A user may have several tokens (one C{token=} field each).

        @raise UnknownUser: if the address is not in the file.
        """
        key = normalize_user(address)
        token = "mh_" + secrets.token_urlsafe(32)
        field = "token=" + hash_token(token)

        def edit(lines: list[str], users: dict[str, UserEntry]) -> list[str]:
            return self._replace_entry(lines, key, lambda e: replace(e, extensions=e.extensions + (field,)))

        self._edit(edit)
        return token

    def check_token(self, token: str) -> str | None:
        """The address owning API token C{token}, or C{None}."""
        if not token or len(token) > 200:
            return None
        wanted = hash_token(token)
        self._refresh()
        for entry in self._users.values():
            if any(hmac.compare_digest(h, wanted) for h in entry.token_hashes):
                return entry.address
        return None

    def _replace_entry(
        self, lines: list[str], key: str, change: Callable[[UserEntry], UserEntry | None]
    ) -> list[str]:
        out: list[str] = []
        found = False
        for line in lines:
            try:
                entry = _parse_line(line)
            except ValueError:
                entry = None
            if entry is not None and entry.address == key:
                found = True
                new = change(entry)
                if new is not None:
                    out.append(new.to_line())
                continue
            out.append(line)
        if not found:
            raise UnknownUser(f"no such user: {key}")
        return out

    def _edit(self, edit: Callable[[list[str], dict[str, UserEntry]], list[str]]) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            lock_fd = os.open(self.path + ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
        except OSError as e:
            raise UsersFileError(f"cannot write {self.path}: {e.strerror}") from e
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            try:
                lines = self._read_lines()
            except OSError as e:
                raise UsersFileError(f"cannot read {self.path}: {e.strerror}") from e
            new_lines = edit(lines, self._parse(lines, warn=False))
            data = "".join(line + "\n" for line in new_lines).encode("utf-8")
            tmp = os.path.join(directory, f".{os.path.basename(self.path)}.tmp{os.getpid()}")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    os.fchmod(fd, 0o600)
                    _keep_owner(fd, self.path)
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, self.path)
                dfd = os.open(directory, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            except OSError as e:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise UsersFileError(f"cannot write {self.path}: {e.strerror}") from e
        finally:
            os.close(lock_fd)
        # Make the next lookup in this process see the edit at once.
        self._checked_at = None
        self._loaded = False


def _keep_owner(fd: int, path: str) -> None:
    """
    Give the new file the owner of the file it replaces, so that root
    running C{mailhub user add} does not leave a file the (unprivileged)
    daemon can no longer read.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
        try:
            os.fchown(fd, st.st_uid, st.st_gid)
        except PermissionError:
            pass


# ---------------------------------------------------------------------------
# twisted.cred


@implementer(ICredentialsChecker)
class UsersChecker:
    """
    Checks L{IUsernamePassword} credentials against a L{UsersFile}.

    The avatar id is the normalised address (C{str}), which is what the
    server records as the authenticated user and passes to L{owns_sender}.
    bcrypt takes tens of milliseconds by design, so the check runs through
    C{run} (L{threads.deferToThread} by default; tests pass a synchronous
    function returning a Deferred).  Unknown users are checked against a
    dummy hash so that both failures take the same time.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(
        self,
        users: UsersFile,
        run: Callable[..., defer.Deferred[Any]] = threads.deferToThread,
    ) -> None:
        self.users = users
        self._run = run

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[str]:
        username = credentials.username
        password = credentials.password
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        if isinstance(password, str):
            password = password.encode("utf-8")
        entry = self.users.get(username)
        hashed = entry.password_hash if entry is not None else _DUMMY_HASH

        def checked(ok: bool) -> str:
            if ok and entry is not None:
                return entry.address
            raise UnauthorizedLogin("invalid credentials")

        d = self._run(_check_hash, password, hashed)
        d.addCallback(checked)
        return d

    def authenticate(self, username: str | bytes, password: str | bytes) -> defer.Deferred[str]:
        """Shortcut: check a user name and password; fires with the address."""
        if isinstance(username, str):
            username = username.encode("utf-8")
        if isinstance(password, str):
            password = password.encode("utf-8")
        return self.requestAvatarId(UsernamePassword(username, password))


# ---------------------------------------------------------------------------
# Sender ownership (submission.sender_check = "strict")


def owns_sender(user: str, sender: str, extra: Iterable[str] = (), separator: str = "+") -> bool:
    """
    Whether authenticated C{user} may use C{sender} as envelope sender.

    Allowed: the user's own address, the same address with an extension
    (C{alice+lists@example.com} for C{alice@example.com}, with
    C{separator}; C{""} turns that off), any address in C{extra} (and its
    extensions), and the null sender C{""} / C{"<>"} (bounces, read
    receipts; Postfix's reject_sender_login_mismatch allows it too).
    Domains compare case-insensitively (IDNA-normalised); local parts are
    folded to lower case, as mailbox lookups fold them.  Anything that does
    not parse is not owned.
    """
    if sender in ("", "<>"):
        return True
    try:
        mailbox = parse_mailbox(sender.strip("<>"))
        local, domain = mailbox.local_key, mailbox.domain_key
    except ValueError:
        return False
    candidates = [f"{local}@{domain}"]
    if separator and separator in local:
        base = local.split(separator, 1)[0]
        if base:
            candidates.append(f"{base}@{domain}")
    owned = set()
    for address in (user, *extra):
        try:
            owned.add(normalize_user(address))
        except ValueError:
            continue
    return any(c in owned for c in candidates)


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
            UsersChecker.requestAvatarId(step)     # step is UsernamePassword

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
