"""
Writing one file into a Maildir, the same way in virtual and system mode.

Owns: the Maildir file of one (message, recipient): its name
(L{MaildirWriter.unique}, deterministic so that a delivery repeated after a
crash finds its first copy), the trace headers prepended to it
(C{Return-Path}, C{Delivered-To}), and the commit per
https://cr.yp.to/proto/maildir.html: created in tmp/ (C{O_EXCL |
O_NOFOLLOW}, by descriptor), given to the recipient (system mode), written,
fsync'd, linked into new/ (renamed where hard links are not available),
new/ fsync'd -- that last fsync shared by concurrent deliveries into the
same Maildir (L{mailhub.queue.durable.DirSync}).  With C{spool.sync =
"syncfs"} the file is not fsync'd on its own and new/'s fsync is the group
C{syncfs()} of its file system (L{mailhub.queue.durable.FileSystemSync}).
L{MaildirWriter.place} and L{MaildirWriter.sync_new} are the two halves
of L{MaildirWriter.write}, for a writer that makes many files durable with
one directory sync (L{mailhub.delivery.direct}).

Must not touch: where the Maildir is and how it is opened (the caller passes
the descriptors of L{mailhub.delivery.system.open_below}), the queued
message (the caller passes an object that writes it, L{Message}), outcomes
(L{mailhub.delivery.local}), the reactor (everything here blocks; the caller
runs it in a thread or a delivery process).
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from mailhub.delivery.system import MaildirFds, give
from mailhub.queue.durable import DirSync, FileSystemSync

__all__ = ["MaildirWriter", "Message", "Pending", "MAX_DIR_SYNCS"]

#: Write buffer of a Maildir file.
WRITE_BUFFER = 1 << 20

#: Maildirs whose new/ group-commit state is remembered (see L{MaildirWriter._sync_new}).
MAX_DIR_SYNCS = 4096


class Message(Protocol):
    """The message as each Maildir copy gets it (L{mailhub.delivery.local.QueuedMessage})."""

    def write_to(self, out: BinaryIO) -> int:
        """Write the message (LF line ends) to C{out}; returns the bytes written."""


def _maildir_host(hostname: str) -> str:
    """The host part of a Maildir name: C{/} and C{:} are escaped as the spec says."""
    return hostname.replace("/", "\\057").replace(":", "\\072") or "localhost"


def _header_value(text: str) -> bytes:
    """A trace header value, never able to start another header."""
    return text.replace("\r", "").replace("\n", "").encode("utf-8", "surrogateescape")


class MaildirWriter:
    """
    Writes Maildir files named after C{hostname}; C{fsync} C{False} only
    for tests that do not measure durability; C{file_systems} (the
    C{syncfs()} groups) instead of a fsync per file and per new/ when
    C{spool.sync = "syncfs"}.  Safe to use from several threads at once.
    """

    def __init__(self, hostname: str, fsync: bool = True, file_systems: FileSystemSync | None = None) -> None:
        self.fsync = fsync
        self.file_systems = file_systems if fsync else None
        self._fsync_files = fsync and file_systems is None
        self._host = _maildir_host(hostname)
        self._syncs_lock = threading.Lock()
        self._syncs: dict[object, DirSync] = {}

    def unique(self, queue_id: str, arrival: float, address: str) -> str:
        """
        C{<sec>.M<usec>Q<queue id>R<hash of address>.<host>}: the arrival time
        of the message, then what makes the name unique -- the spool's queue
        id (unique on this host) and the recipient.  Deliberately
        deterministic: the same (message, recipient) always gets the same
        name, so a delivery repeated after a crash (file in new/, outcome not
        yet recorded in the spool) finds its first copy instead of leaving a
        duplicate.  The maildir spec only asks for uniqueness; its
        M, Q, R fields are conventions, and a random R would defeat this.
        """
        sec = int(arrival)
        usec = min(int((arrival - sec) * 1_000_000), 999_999)
        qid = "".join(c for c in queue_id if c.isalnum()) or "0"
        tag = hashlib.sha256(address.lower().encode("utf-8", "surrogateescape")).hexdigest()[:12]
        return f"{sec}.M{usec}Q{qid}R{tag}.{self._host}"

    def _sync_new(self, key: object, fsync: Callable[[], None]) -> None:
        """
        Make a link into a Maildir's new/ durable, sharing the fsync with
        concurrent deliveries into the same Maildir (L{DirSync}): under load
        most mail goes to few mailboxes, and one directory fsync then covers
        every file linked before it began.  The table is bounded; forgetting
        an entry only costs a group its sharing, never its fsync.
        """
        with self._syncs_lock:
            ds = self._syncs.get(key)
            if ds is None:
                if len(self._syncs) >= MAX_DIR_SYNCS:
                    self._syncs.clear()
                ds = self._syncs[key] = DirSync()
        ds.sync(fsync)

    def _write_header_and_body(self, out: BinaryIO, sender: str, address: str, message: Message) -> int:
        header = (
            b"Return-Path: <" + _header_value(sender) + b">\n"
            b"Delivered-To: " + _header_value(address) + b"\n"
        )
        out.write(header)
        return len(header) + message.write_to(out)

    def write(self, fds: MaildirFds, unique: str, sender: str, address: str, message: Message) -> None:
        """
        L{place} the file, then make new/ durable (L{sync_new}).
        """
        self.place(fds, unique, sender, address, message)
        if self.fsync:
            self.sync_new(fds)

    def sync_key(self, fds: MaildirFds) -> tuple[int, int]:
        """
        What one L{sync_new} covers: new/ itself (device and inode), or
        with C{syncfs()} its whole file system (device, 0).
        """
        st = os.fstat(fds.new)
        return (st.st_dev, 0) if self.file_systems is not None else (st.st_dev, st.st_ino)

    def sync_new(self, fds: MaildirFds) -> None:
        """
        Make every link made into C{fds.new} so far durable: an fsync of
        new/ shared with concurrent deliveries into the same Maildir, or
        the group C{syncfs()} of its file system.
        """
        new_fd = fds.new
        if self.file_systems is not None:
            self.file_systems.sync(new_fd)
            return
        # keyed by inode, not path: the user owns the path; the fsync
        # is made on a descriptor the leader holds, of that same inode
        st = os.fstat(new_fd)
        self._sync_new((st.st_dev, st.st_ino), lambda: os.fsync(new_fd))

    def place(self, fds: MaildirFds, unique: str, sender: str, address: str, message: Message) -> None:
        """
        Write one Maildir file into a Maildir opened by
        L{mailhub.delivery.system.open_below}:
        created in tmp/ (C{O_EXCL | O_NOFOLLOW}), written, fsync'd (not
        with C{syncfs()}), linked into new/ -- durable once L{sync_new} of
        the same Maildir has returned.  If this exact delivery is already in new/
        (or was moved to cur/ by a reader) nothing is added.  Every name is
        relative to a directory descriptor and nothing is followed; in
        system mode the new file is given to the recipient (C{fchown})
        before a byte is written, so quota and ownership are the
        recipient's, and what the user can rename in their own tmp/ is
        never written or chowned by path.  The three steps are
        L{prepare}, L{make_durable} and L{publish}: a writer of many files
        writes them all before it fsyncs any (on a journalling file
        system the first fsync then commits them all).
        """
        pending = self.prepare(fds, unique, sender, address, message)
        try:
            self.make_durable(pending)
            self.publish(pending)
        except BaseException:
            self.discard(pending)
            raise

    def prepare(self, fds: MaildirFds, unique: str, sender: str, address: str, message: Message) -> Pending:
        """The file created in tmp/ and written, still open and not yet fsync'd (see L{place})."""
        try:
            os.unlink(unique, dir_fd=fds.tmp)  # ours, left by a crash (or whatever the user put there)
        except FileNotFoundError:
            pass
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(unique, flags, 0o600, dir_fd=fds.tmp)
        try:
            try:
                give(fd, fds.uid, fds.gid)
                out = os.fdopen(fd, "wb", buffering=WRITE_BUFFER)
            except BaseException:
                os.close(fd)
                raise
            pending = Pending(fds, unique, 0, out)
            try:
                pending.size = self._write_header_and_body(out, sender, address, message)
                out.flush()
            except BaseException:
                out.close()
                raise
        except BaseException:
            _unlink_quietly(unique, fds.tmp)
            raise
        return pending

    def make_durable(self, pending: Pending) -> None:
        """fsync the file written by L{prepare} (not with C{syncfs()}) and close it."""
        out = pending.out
        try:
            if self._fsync_files:
                os.fsync(out.fileno())
        finally:
            out.close()

    def publish(self, pending: Pending) -> None:
        """Link the durable file into new/ (unless this delivery is already there or in cur/)."""
        fds, unique = pending.fds, pending.unique
        name = f"{unique},S={pending.size}"
        if any(_exists_at(fds.cur, f"{name}:2,{flags}") for flags in _CUR_FLAGS):
            os.unlink(unique, dir_fd=fds.tmp)
            return
        try:
            os.link(unique, name, src_dir_fd=fds.tmp, dst_dir_fd=fds.new, follow_symlinks=False)
        except FileExistsError:
            pass
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            if not _exists_at(fds.new, name):  # no hard links here: rename
                os.rename(unique, name, src_dir_fd=fds.tmp, dst_dir_fd=fds.new)
        try:
            os.unlink(unique, dir_fd=fds.tmp)
        except FileNotFoundError:
            pass

    def discard(self, pending: Pending) -> None:
        """Throw away a file that will not be published (an error on the way)."""
        if not pending.out.closed:
            try:
                pending.out.close()
            except OSError:
                pass
        _unlink_quietly(pending.unique, pending.fds.tmp)


@dataclass
class Pending:
    """A Maildir file written in tmp/ by L{MaildirWriter.prepare}, open until it is durable."""

    fds: MaildirFds
    unique: str
    size: int
    out: BinaryIO


def _unlink_quietly(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


#: The flag sets probed in cur/ for an already delivered copy that a reader moved (see L{MaildirWriter.write}).
_CUR_FLAGS = ("", "S", "RS", "FS", "T", "ST")


def _exists_at(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True
