"""
The pickup file: its format, and writing one into the pickup area.

Owns: C{SPOOL/pickup/} (C{tmp/} and C{new/}, their modes), the pickup
file format (L{format_header} / L{read_header}), L{write_pickup} (used by
mailhub-sendmail without the daemon) and L{list_pickup} (the queue
listing).  Writing a pickup file needs no daemon and no privilege beyond
write access to the drop directories.

Must not touch: the queue (only the daemon's L{mailhub.queue.pickup.PickupService}
turns a pickup file into a queued message), the reactor, the network.

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

import os
import re
import secrets
import stat
import time
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

from mailhub.address import AddressError, parse_mailbox
from mailhub.queue.durable import fsync_dir

__all__ = [
    "PICKUP_VERSION",
    "DIR_MODE",
    "GROUP_DIR_MODE",
    "FILE_MODE",
    "MAX_HEADER",
    "PickupError",
    "PickupFormatError",
    "MessageTooLarge",
    "PickupHeader",
    "PickupEntry",
    "CRLFNormalizer",
    "pickup_dirs",
    "ensure_pickup_dirs",
    "clean_fullname",
    "format_header",
    "read_header",
    "unique_name",
    "is_pickup_name",
    "write_pickup",
    "list_pickup",
]


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


def is_pickup_name(name: str) -> bool:
    """Whether C{name} can be a pickup file name (what L{unique_name} makes, and no path)."""
    return _NAME.match(name) is not None


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


def unique_name() -> str:
    """A fresh pickup file name: time, process id and 64 random bits."""
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
    name: str | None = None,
) -> str:
    """
    Drop a message into the pickup area and return the pickup file name.

    The file is written in C{pickup/tmp/}, fsync'd, made readable and
    renamed into C{pickup/new/}: the daemon never sees a partial file.
    Message bytes are streamed (bounded memory) with line endings made CRLF.

    @param message: a binary file or an iterable of byte chunks.
    @param max_size: limit on the message bytes after conversion.
    @param name: the file name to use (L{unique_name}, the default, makes one).
    @raise MessageTooLarge: nothing is left behind.
    @raise OSError: the pickup area is missing, not writable, or full.
    """
    tmp_dir, new_dir = pickup_dirs(spool_path)
    header = format_header(sender, recipients, fullname)
    if name is None:
        name = unique_name()
    elif not is_pickup_name(name):
        raise ValueError(f"not a pickup file name: {name!r}")
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
