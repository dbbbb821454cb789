"""
The users file: who may log in (SMTP AUTH, the HTTP API) and with what.

Owns: the file named by C{auth.users} (reading it, reloading it when it
changes, rewriting it atomically for C{mailhub user}), user-name
normalisation, password acceptability and bcrypt hashing, API tokens, the
password check as a L{twisted.cred} checker (run off the reactor thread),
and sender ownership (which envelope senders a user may use, for
C{submission.sender_check = "strict"} and the HTTP API).

Must not touch: any protocol (the SASL exchanges and the failed-login
throttle are L{mailhub.smtp.sasl}'s, the SMTP replies the server's), the
relay decision (L{mailhub.smtp.policy}), configuration files.  A core
module: it imports nothing from C{smtp/}, C{queue/}, C{web/} or C{cli/},
which all use it.

The module stays a little over 500 lines because it is one job: the file
format, its edits and the credentials and identities it holds are read
and written in one place so they cannot drift apart.

Users file format (one user per line, readable with C{cat})::

    # comment; blank lines are ignored
    alice@example.com:$2b$12$<53 characters of bcrypt salt+hash>
    bob@example.com:$2b$12$...:senders=bob@example.org,postmaster@example.com

Fields are separated by C{:}.  The first is the address (normalised: domain
in lower case IDNA A-labels, local part folded to lower case as the mailbox
directory does), the second a bcrypt hash, and any further fields are
C{name=value} extensions.  Known: C{senders=} (comma-separated extra
envelope senders the user may use) and C{token=sha256-HEX} (an API token
of the HTTP interface, see L{UsersFile.add_token}; repeatable).  Unknown
extensions are kept untouched when the file is rewritten.  Addresses may
therefore not contain C{:}, white space or quotes.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import bcrypt
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, threads
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
    "MAX_PASSWORD_BYTES",
    "DEFAULT_ROUNDS",
]

log = Logger()

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


def _check_hash(password: bytes, hashed: str | None) -> bool:
    """
    bcrypt.checkpw that answers False instead of raising.  C{hashed} None
    (an unknown user) checks against L{_dummy_hash}, so that a failed login
    takes as long whether or not the user exists.
    """
    if hashed is None:
        hashed = _dummy_hash()
    if len(password) > MAX_PASSWORD_BYTES:
        return False
    try:
        return bcrypt.checkpw(password, hashed.encode("ascii"))
    except (ValueError, UnicodeError):
        return False


@functools.cache
def _dummy_hash() -> str:
    """A valid hash of a random password, made once, on first use (in the checker's thread, never at import)."""
    return bcrypt.hashpw(os.urandom(16).hex().encode(), bcrypt.gensalt(DEFAULT_ROUNDS)).decode()


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

    # Twisted's ICredentialsChecker types avatar ids as bytes; mailhub's are str addresses (the portal passes them through).
    def requestAvatarId(self, credentials: Any) -> defer.Deferred[str]:  # type: ignore[override]
        username = credentials.username
        password = credentials.password
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        if isinstance(password, str):
            password = password.encode("utf-8")
        entry = self.users.get(username)
        hashed = entry.password_hash if entry is not None else None

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
