"""
The pickup area: where local programs (mailhub-sendmail) drop messages for
the daemon, like Postfix's maildrop directory.

Owns: C{SPOOL/pickup/} (C{tmp/} and C{new/}), the pickup file format, and
turning a pickup file into a queued message (L{PickupService}).  Writing a
pickup file (L{write_pickup}) needs no daemon and no privilege beyond write
access to the drop directories.

Must not touch: the rest of the spool except through L{Spool}'s public API
(C{new_message} / C{commit}); delivery and retry decisions (the scheduler's).

Pickup file format (version 1), a text header block then the message::

    mailhub-pickup 1\\n
    sender alice@example.org\\n          exactly once; empty value = <>
    fullname Alice Example\\n            optional, informational
    recipient bob@example.org\\n         one or more
    \\n
    MESSAGE BYTES, CRLF line endings

Header lines are UTF-8 and end in LF; the message is stored as it will be
queued (CRLF).  There is deliberately no key for the submitting user: the
daemon takes the identity from the file's owner (C{fstat().st_uid}) at
pickup time, so it cannot be forged by writing a field.  Any unknown key
makes the file unreadable (moved to C{SPOOL/corrupt/}), so a newer writer
cannot silently lose information with an older daemon: it bumps the version.

Privilege model: C{pickup/}, C{pickup/tmp/} and C{pickup/new/} are mode
1733 (sticky, world-writable, not listable), like Postfix's 1730 maildrop
minus the setgid C{postdrop} helper.  Any local user can create a file but
cannot see, rename or remove anyone else's; files are 0644 so a daemon
that does not run as root can read them, and their names carry 64 random
bits so they cannot be found without a listing.  The daemon must own the
directories (the sticky bit lets the directory owner remove files).
"""

from __future__ import annotations

import email.utils
import errno
import os
import pwd
import re
import secrets
import socket
import stat
import time
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from twisted.application import service
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailhub.address import AddressError, parse_mailbox
from mailhub.envelope import Envelope, Recipient
from mailhub.maillog import mail_event
from mailhub.queue.durable import fsync_dir
from mailhub.queue.spool import Spool
from mailhub.rfc5322 import after_trace_header, trace_header

__all__ = [
    "PICKUP_VERSION",
    "DIR_MODE",
    "FILE_MODE",
    "PickupError",
    "PickupFormatError",
    "MessageTooLarge",
    "PickupHeader",
    "CRLFNormalizer",
    "pickup_dirs",
    "ensure_pickup_dirs",
    "clean_fullname",
    "format_header",
    "read_header",
    "write_pickup",
    "list_pickup",
    "PickupService",
]

log = Logger()

PICKUP_VERSION = 1
_MAGIC = b"mailhub-pickup %d\n" % PICKUP_VERSION
#: Mode of pickup/, pickup/tmp/, pickup/new/: sticky, writable by all, not listable.
DIR_MODE = 0o1733
#: With a submission group: members may submit, others may not even look.
GROUP_DIR_MODE = 0o1730
#: Mode of a finished pickup file: readable by an unprivileged daemon.
FILE_MODE = 0o644
#: The header block may not be longer than this (about 20000 recipients).
MAX_HEADER = 1024 * 1024
_MAX_LINE = 2048
_NAME = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,99}\Z")
_CHUNK = 65536


class PickupError(Exception):
    """Base class of pickup problems."""


class PickupFormatError(PickupError, ValueError):
    """A pickup file cannot be parsed."""


class MessageTooLarge(PickupError):
    """The message exceeds the configured size limit (Postfix message_size_limit)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"message too large (limit {limit} bytes)")
        self.limit = limit


@dataclass(frozen=True)
class PickupHeader:
    """The envelope part of a pickup file, as the submitter wrote it."""

    sender: str
    recipients: tuple[str, ...]
    fullname: str | None = None
    size: int = field(default=0, compare=False)  # bytes of the header block itself


def pickup_dirs(spool_path: str) -> tuple[str, str]:
    """C{(tmp, new)} paths of the pickup area of the spool at C{spool_path}."""
    base = os.path.join(spool_path, "pickup")
    return os.path.join(base, "tmp"), os.path.join(base, "new")


def ensure_pickup_dirs(spool_path: str, mode: int = DIR_MODE, gid: int | None = None) -> None:
    """
    Create the pickup directories with C{mode} (explicit chmod: the umask
    must not take the sticky or write bits away), and make the spool root
    searchable (adds C{--x} only: nothing becomes listable) so that users
    can reach C{pickup/}.  Run by the daemon at start.

    With C{gid} (a submission group, like Postfix's C{postdrop}) the
    directories belong to that group and C{mode} should leave nothing to
    "others" (C{GROUP_DIR_MODE}): only the group's members may submit.
    """
    base = os.path.join(spool_path, "pickup")
    for path in (base, *pickup_dirs(spool_path)):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(path)
        if gid is not None and st.st_gid != gid:
            os.chown(path, -1, gid)
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(path, mode)
    root = os.stat(spool_path)
    if mode & 0o011 and stat.S_IMODE(root.st_mode) & 0o011 != 0o011:
        os.chmod(spool_path, stat.S_IMODE(root.st_mode) | 0o111)


# -- the format ------------------------------------------------------------------------


def _check_value(text: str) -> None:
    if "\n" in text or "\r" in text or "\x00" in text:
        raise ValueError("line breaks are not allowed in a pickup header value")


def clean_fullname(name: str | None) -> str | None:
    """
    A full name (sendmail C{-F}, GECOS) made safe for a header line: control
    characters (C0, DEL, C1) and Unicode line/paragraph separators become
    spaces and runs of white space one space, so a name can never start a
    new header line.  Postfix sanitises the full name the same way instead
    of refusing the message.  C{None} or an empty result is C{None}.
    """
    if name is None:
        return None
    out = "".join(" " if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in name)
    return " ".join(out.split()) or None


def format_header(sender: str, recipients: Iterable[str], fullname: str | None = None) -> bytes:
    """The header block of a pickup file, ending with its blank line."""
    lines = [_MAGIC.decode("ascii").rstrip("\n")]
    _check_value(sender)
    lines.append(f"sender {sender}" if sender else "sender")
    fullname = clean_fullname(fullname)
    if fullname:
        lines.append(f"fullname {fullname}")
    count = 0
    for r in recipients:
        _check_value(r)
        lines.append(f"recipient {r}")
        count += 1
    if not count:
        raise ValueError("no recipients")
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def read_header(f: BinaryIO, limit: int = MAX_HEADER) -> PickupHeader:
    """
    Read and validate the header block of a pickup file from C{f}, leaving
    C{f} positioned at the first message byte.

    @raise PickupFormatError: anything but a valid version-1 header.
    """
    first = f.readline(len(_MAGIC) + 1)
    if first != _MAGIC:
        if first.startswith(b"mailhub-pickup "):
            raise PickupFormatError(f"unsupported pickup version {first[15:].strip()!r}")
        raise PickupFormatError("not a mailhub pickup file")
    total = len(first)
    sender: str | None = None
    fullname: str | None = None
    recipients: list[str] = []
    while True:
        raw = f.readline(_MAX_LINE + 1)
        total += len(raw)
        if total > limit:
            raise PickupFormatError("header block too long")
        if not raw.endswith(b"\n"):
            raise PickupFormatError("truncated header" if len(raw) <= _MAX_LINE else "header line too long")
        if raw == b"\n":
            break
        try:
            line = raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise PickupFormatError("header is not UTF-8")
        key, _, value = line.partition(" ")
        if key == "sender":
            if sender is not None:
                raise PickupFormatError("more than one sender")
            if value:
                try:
                    parse_mailbox(value)
                except AddressError as e:
                    raise PickupFormatError(f"bad sender {value!r}: {e}")
            sender = value
        elif key == "recipient":
            try:
                parse_mailbox(value)
            except AddressError as e:
                raise PickupFormatError(f"bad recipient {value!r}: {e}")
            recipients.append(value)
        elif key == "fullname":
            fullname = value
        else:
            raise PickupFormatError(f"unknown header key {key!r}")
    if sender is None:
        raise PickupFormatError("no sender line")
    if not recipients:
        raise PickupFormatError("no recipients")
    return PickupHeader(sender, tuple(recipients), fullname, total)


class CRLFNormalizer:
    """
    Streaming line-ending conversion: LF and CRLF become CRLF, whatever
    the chunk boundaries; a bare CR inside a line is kept.  Memory is
    bounded by the chunk size.
    """

    def __init__(self) -> None:
        self._cr = False  # the previous chunk ended with CR
        self._last = b"\n"  # last byte written (to terminate the last line)

    def feed(self, data: bytes) -> bytes:
        if not data:
            return b""
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._cr = True
        out = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if out:
            self._last = out[-1:]
        return out

    def close(self) -> bytes:
        """What is still owed at the end: a pending CR, a final CRLF."""
        if self._cr:
            self._cr = False
            self._last = b"\n"
            return b"\r\n"
        if self._last != b"\n":
            self._last = b"\n"
            return b"\r\n"
        return b""


def _chunks(message: BinaryIO | Iterable[bytes]) -> Iterable[bytes]:
    read = getattr(message, "read", None)
    if read is None:
        yield from message  # type: ignore[misc]
        return
    while True:
        data = read(_CHUNK)
        if not data:
            return
        yield data


def _fsync_dir(path: str) -> None:
    try:
        fsync_dir(path)
    except PermissionError:
        # An unprivileged submitter cannot open the unlistable new/: the
        # file itself was fsync'd; the daemon syncs new/ when it reads.
        pass


def _unique_name() -> str:
    return f"{int(time.time())}.{os.getpid()}.{secrets.token_hex(8)}"


def write_pickup(
    spool_path: str,
    sender: str,
    recipients: Iterable[str],
    message: BinaryIO | Iterable[bytes],
    fullname: str | None = None,
    max_size: int | None = None,
    fsync: bool = True,
    file_mode: int = FILE_MODE,
) -> str:
    """
    Drop a message into the pickup area and return the pickup file name.

    The file is written in C{pickup/tmp/}, fsync'd, made readable and
    renamed into C{pickup/new/}: the daemon never sees a partial file.
    Message bytes are streamed (bounded memory) with line endings made CRLF.

    @param message: a binary file or an iterable of byte chunks.
    @param max_size: limit on the message bytes after conversion.
    @raise MessageTooLarge: nothing is left behind.
    @raise OSError: the pickup area is missing, not writable, or full.
    """
    tmp_dir, new_dir = pickup_dirs(spool_path)
    header = format_header(sender, recipients, fullname)
    name = _unique_name()
    tmp = os.path.join(tmp_dir, name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    done = False
    try:
        with os.fdopen(fd, "wb", buffering=_CHUNK) as f:
            f.write(header)
            size = 0
            norm = CRLFNormalizer()
            for chunk in _chunks(message):
                out = norm.feed(chunk)
                size += len(out)
                if max_size is not None and size > max_size:
                    raise MessageTooLarge(max_size)
                f.write(out)
            out = norm.close()
            size += len(out)
            if max_size is not None and size > max_size:
                raise MessageTooLarge(max_size)
            f.write(out)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
            os.fchmod(f.fileno(), file_mode)
        os.rename(tmp, os.path.join(new_dir, name))
        done = True
    finally:
        if not done:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    if fsync:
        _fsync_dir(new_dir)
    return name


@dataclass(frozen=True)
class PickupEntry:
    """A file waiting in C{pickup/new/}, for the queue listing."""

    name: str
    size: int
    mtime: float
    uid: int
    header: PickupHeader | None  # None: unreadable


def list_pickup(spool_path: str) -> list[PickupEntry]:
    """The files waiting in C{pickup/new/} (needs read access to it)."""
    new_dir = pickup_dirs(spool_path)[1]
    try:
        names = sorted(os.listdir(new_dir))
    except FileNotFoundError:
        return []
    entries = []
    for name in names:
        path = os.path.join(new_dir, name)
        # Never blocks on a FIFO, never follows a link; only regular files
        # are listed (the daemon moves anything else to corrupt/).
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                continue
            f = os.fdopen(fd, "rb")
            fd = -1  # f owns it now
            with f:
                try:
                    header: PickupHeader | None = read_header(f)
                except PickupFormatError:
                    header = None
        except OSError:
            continue
        finally:
            if fd >= 0:
                os.close(fd)
        size = st.st_size - (header.size if header else 0)
        entries.append(PickupEntry(name, size, st.st_mtime, st.st_uid, header))
    return entries


# -- the daemon side ---------------------------------------------------------------------


class _EntryError(Exception):
    """One pickup entry cannot be read or moved now; the other entries are not affected."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def _kind(mode: int) -> str:
    """What a non-regular directory entry is, for the log line of its quarantine."""
    for test, what in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISLNK, "symbolic link"), (stat.S_ISCHR, "device"), (stat.S_ISBLK, "device")):
        if test(mode):
            return f"not a regular file ({what})"
    return "not a regular file"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


def _default_notifier(clock: Any) -> Any:
    """A started INotify on C{clock} (the reactor), or C{None} where unavailable."""
    try:
        from twisted.internet import inotify
    except ImportError:
        return None
    try:
        notifier = inotify.INotify(reactor=clock)
    except Exception:  # INotifyError, or a reactor without file descriptors
        return None
    notifier.startReading()
    return notifier


class PickupService(service.Service):
    """
    Moves pickup files into the queue: at start, whenever inotify reports a
    file in C{pickup/new/}, and on a timer (every C{poll_interval} seconds
    when inotify is unavailable; every C{rescan_interval} seconds anyway, to
    survive an inotify queue overflow and to retry after a full disk).

    Each file becomes a normal queued message (C{Spool.new_message} /
    C{commit}) with a C{Received:} header naming the file owner's uid; the
    pickup file is unlinked only after the commit (at-least-once).  The
    pickup file name and owner uid are recorded in C{envelope.client}; at
    start, a file already recorded in the queue (crash between commit and
    unlink) is removed instead of being queued twice.

    @param resolve_recipient: maps a recipient address to its final
        delivery addresses (aliases, extensions) like the SMTP server's
        policy does; it must return C{[address]} for addresses it does not
        handle.  If it raises, the address is queued unresolved and the
        delivery outcome decides (a bounce, by the scheduler).
    @param notifier_factory: C{clock -> INotify-like or None}; tests pass a fake.
    """

    name = "pickup"

    def __init__(
        self,
        spool: Spool,
        enqueue: Callable[[Envelope], None],
        clock: IReactorTime,
        max_size: int,
        resolve_recipient: Callable[[str], list[str]] | None = None,
        hostname: str | None = None,
        notifier_factory: Callable[[Any], Any] = _default_notifier,
        poll_interval: float = 1.0,
        rescan_interval: float = 60.0,
        dir_mode: int = DIR_MODE,
        gid: int | None = None,
    ) -> None:
        self.spool = spool
        self.enqueue = enqueue
        self.clock = clock
        self.max_size = max_size
        self.resolve_recipient = resolve_recipient
        self.hostname = hostname or socket.getfqdn()
        self.notifier_factory = notifier_factory
        self.poll_interval = poll_interval
        self.rescan_interval = rescan_interval
        self.dir_mode = dir_mode
        self.gid = gid
        self.tmp_dir, self.new_dir = pickup_dirs(spool.path)
        self._notifier: Any = None
        self._timer: Any = None
        self._soon: Any = None
        self._recovered: set[tuple[str, int]] = set()  # queued before a restart
        self._stuck: set[tuple[str, int]] = set()  # queued, but unlink failed

    # -- lifecycle ------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        ensure_pickup_dirs(self.spool.path, self.dir_mode, self.gid)
        self._clean_tmp()
        # Read the queue now, before any delivery could remove an envelope
        # whose pickup file survived a crash between commit and unlink.
        if os.listdir(self.new_dir):
            for env in self.spool:
                name, uid = env.client.get("pickup"), env.client.get("uid")
                if isinstance(name, str) and isinstance(uid, int):
                    self._recovered.add((name, uid))
        self._notifier = self.notifier_factory(self.clock)
        if self._notifier is not None:
            from twisted.internet import inotify
            from twisted.python.filepath import FilePath

            self._notifier.watch(
                FilePath(self.new_dir),
                mask=inotify.IN_MOVED_TO | inotify.IN_CLOSE_WRITE,
                callbacks=[self._changed],
            )
        # First scan on the first reactor turn: every service has started.
        self._schedule(0)

    def stopService(self) -> Any:
        for call in (self._timer, self._soon):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._soon = None
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None
        return super().stopService()

    def _clean_tmp(self) -> None:
        """Files in pickup/tmp/ older than a day are abandoned submissions."""
        now = self.clock.seconds()
        for name in os.listdir(self.tmp_dir):
            path = os.path.join(self.tmp_dir, name)
            try:
                if now - os.lstat(path).st_mtime > 86400:
                    os.unlink(path)
            except OSError:
                pass

    def _changed(self, _watch: Any, _path: Any, _mask: int) -> None:
        self._schedule(0)

    def _schedule(self, delay: float) -> None:
        if delay == 0:
            if self._soon is None or not self._soon.active():
                self._soon = self.clock.callLater(0, self.scan)
            return
        if self._timer is None or not self._timer.active():
            self._timer = self.clock.callLater(delay, self.scan)

    # -- work -------------------------------------------------------------------------------

    def scan(self) -> int:
        """Queue every file in C{pickup/new/}; return how many were queued."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        queued = 0
        retry = False
        try:
            names = sorted(os.listdir(self.new_dir))
        except OSError as e:
            log.error("pickup: cannot list {dir}: {error}", dir=self.new_dir, error=e)
            names = []
            retry = True
        for name in names:
            try:
                if self._pick(name):
                    queued += 1
            except _EntryError as e:
                # This entry only (unreadable, cannot be moved): the next
                # scan tries it again; the others go on now.
                log.error("pickup: {name}: skipped, will retry: {error}", name=name, error=e.error)
            except OSError as e:
                # Spool full or unwritable: leave the file, try again later.
                log.error("pickup: {name}: cannot queue, will retry: {error}", name=name, error=e)
                retry = True
                break
        self._recovered.clear()
        if self.running:
            if self._notifier is None:
                self._schedule(self.poll_interval)
            else:
                self._schedule(self.poll_interval if retry else self.rescan_interval)
        return queued

    def _quarantine(self, name: str, why: str) -> None:
        src = os.path.join(self.new_dir, name)
        target = os.path.join(self.spool.path, "corrupt", "pickup." + (name if _NAME.match(name) else "file"))
        if os.path.lexists(target):
            target += "." + secrets.token_hex(4)
        try:
            os.rename(src, target)
        except FileNotFoundError:
            return
        except OSError as e:
            raise _EntryError(e)
        log.error("pickup: moved {path} to {target}: {why}", path=src, target=target, why=why)

    def _open_entry(self, name: str, path: str) -> int | None:
        """
        Open the pickup entry C{name} for reading; return its descriptor, or
        C{None} when it is gone or was moved to C{corrupt/} (anything but a
        regular file: directory, FIFO, socket, device, symbolic link).  The
        entry is looked at with C{lstat} first, so a FIFO or a device is
        never opened; the C{fstat} of the open descriptor decides (the entry
        may have been replaced in between).

        @raise _EntryError: it cannot be opened for another reason.
        """
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise _EntryError(e)
        if not stat.S_ISREG(st.st_mode):
            self._quarantine(name, _kind(st.st_mode))
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                self._quarantine(name, "not a regular file")
                return None
            raise _EntryError(e)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            self._quarantine(name, _kind(st.st_mode))
            return None
        return fd

    def _pick(self, name: str) -> bool:
        """
        Queue one pickup file.

        @raise _EntryError: this entry cannot be read now (the others can).
        @raise OSError: the spool cannot take the message (retry later).
        """
        path = os.path.join(self.new_dir, name)
        if not _NAME.match(name):
            self._quarantine(name, "not a pickup file name")
            return False
        fd = self._open_entry(name, path)
        if fd is None:
            return False
        try:
            f = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        with f:
            st = os.fstat(fd)
            if st.st_nlink != 1:
                # A hard link to someone else's file would carry their uid.
                self._quarantine(name, f"{st.st_nlink} hard links")
                return False
            uid = st.st_uid
            if (name, uid) in self._stuck:
                return False
            if (name, uid) in self._recovered:
                os.unlink(path)
                log.info("pickup: {name}: already queued before a restart, removed", name=name)
                return False
            if st.st_size > self.max_size + MAX_HEADER:
                self._quarantine(name, f"message too large ({st.st_size} bytes, limit {self.max_size})")
                return False
            try:
                header = read_header(f)
            except PickupFormatError as e:
                self._quarantine(name, str(e))
                return False
            except OSError as e:
                raise _EntryError(e)
            if st.st_size - header.size > self.max_size:
                self._quarantine(name, f"message too large (limit {self.max_size} bytes)")
                return False
            env = self._queue(f, name, uid, header)
        try:
            os.unlink(path)
        except OSError as e:
            # Queued already: never queue this file again in this run.
            self._stuck.add((name, uid))
            log.error("pickup: {name}: queued as {queue_id} but cannot remove: {error}",
                      name=name, queue_id=env.queue_id, error=e)
        mail_event(
            "pickup",
            "{queue_id}: uid={uid} from=<{sender}> nrcpt={nrcpt} (pickup {pickup})",
            queue_id=env.queue_id,
            uid=uid,
            sender=env.sender,
            nrcpt=len(env.recipients),
            pickup=name,
        )
        self.enqueue(env)
        return True

    def _recipients(self, header: PickupHeader) -> list[Recipient]:
        out: list[Recipient] = []
        seen: set[str] = set()
        for original in header.recipients:
            addresses = [original]
            if self.resolve_recipient is not None:
                try:
                    addresses = list(self.resolve_recipient(original))
                except Exception as e:
                    log.warn("pickup: cannot resolve {rcpt}, queued as is: {error}", rcpt=original, error=e)
                    addresses = [original]
            for address in addresses:
                if address not in seen:
                    seen.add(address)
                    out.append(Recipient(address=address, original=original))
        return out

    def _queue(self, f: BinaryIO, name: str, uid: int, header: PickupHeader) -> Envelope:
        now = self.clock.seconds()
        writer = self.spool.new_message()
        user = _user_name(uid)
        try:
            clauses = [f"by {self.hostname} (mailhub, from userid {uid})", f"id {writer.queue_id}"]
            writer.write(trace_header(clauses, email.utils.formatdate(now, localtime=True)))
            eight_bit = False
            first = True
            while True:
                try:
                    chunk = f.read(_CHUNK)
                except OSError as e:
                    raise _EntryError(e)
                if not chunk:
                    break
                if first:
                    first = False
                    writer.write(after_trace_header(chunk))
                eight_bit = eight_bit or not chunk.isascii()
                writer.write(chunk)
            esmtp: dict[str, Any] = {"size": writer.size, "body": "8BITMIME" if eight_bit else "7BIT"}
            if not header.sender.isascii() or not all(r.isascii() for r in header.recipients):
                esmtp["smtputf8"] = True
            env = Envelope(
                queue_id=writer.queue_id,
                sender=header.sender,
                recipients=self._recipients(header),
                arrival=now,
                next_attempt=now,
                esmtp=esmtp,
                client={"protocol": "local", "user": user, "uid": uid, "pickup": name},
            )
        except BaseException:
            writer.abort()
            raise
        writer.commit(env)
        return env
