"""
Local delivery: copy a queued message into recipients' Maildirs.

Owns: the Maildir files mailhub writes (tmp/ -> new/, per
https://cr.yp.to/proto/maildir.html, named so that a delivery repeated
after a crash is recognised), the trace headers prepended to them
(C{Return-Path}, C{Delivered-To}), the forwarding-loop check, and turning
file-system errors into per-recipient L{Outcome}s (house rule 4).

Both modes open the Maildir the same way (L{mailhub.delivery.system.open_below}: no
symlink followed below the mailbox root or the home directory, every
directory opened relative to its parent's descriptor) and write the file
by descriptor.  Virtual mode: C{<mailboxes>/<domain>/<user>}
(L{mailhub.delivery.system.open_virtual_maildir}).  System mode (C{directory.mode ==
"system"}): C{~user/Maildir} (L{mailhub.delivery.system.open_maildir}, directories
owned by the user); each new file is C{fchown}ed to the recipient before
it is written.

Must not touch: the spool (the message file is only read), retry decisions
(the scheduler's), alias and mailbox lookups (the directory's), the
reactor (file work runs through the injected C{run}, a thread by default).
Logs nothing per recipient: the scheduler logs outcomes.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailhub.delivery import system
from mailhub.delivery.directory import Directory
from mailhub.delivery.errors import InvalidMailbox, RecipientError, UnknownRecipient
from mailhub.envelope import Envelope, Outcome, Recipient
from mailhub.queue.spool import DirSync, QueueFileError, open_message

__all__ = ["LocalDelivery", "CHUNK_SIZE"]

log = Logger()

#: Bytes read from the spool per read; the message is never read whole.
CHUNK_SIZE = 1 << 20

#: Recipients of one message whose Maildir files are written at once (see
#: L{LocalDelivery._deliver_all}).
PARALLEL_RECIPIENTS = 8

#: Header bytes scanned for Delivered-To before giving up (the header section
#: of a sane message is far smaller; a hostile one must not cost memory).
MAX_HEADER_SCAN = 1 << 20

#: Maildirs whose new/ group-commit state is remembered (see L{LocalDelivery._sync_new}).
MAX_DIR_SYNCS = 4096

_QUOTA_ERRNOS = {getattr(errno, "EDQUOT", -1)}
_PERMISSION_ERRNOS = {errno.EACCES, errno.EPERM}


def _maildir_host(hostname: str) -> str:
    """The host part of a Maildir name: C{/} and C{:} are escaped as the spec says."""
    return hostname.replace("/", "\\057").replace(":", "\\072") or "localhost"


def _header_value(text: str) -> bytes:
    """A trace header value, never able to start another header."""
    return text.replace("\r", "").replace("\n", "").encode("utf-8", "surrogateescape")


def delivered_to_addresses(path: str) -> set[str]:
    """
    The C{Delivered-To} addresses (lower case, without angle brackets) in
    the header section of the queued message at C{path} (a queue file,
    L{open_message}): everything before the first empty line, folded lines
    unfolded.
    """
    with open_message(path) as f:
        return _delivered_to(f)


def _delivered_to(f: BinaryIO) -> set[str]:
    """L{delivered_to_addresses} of an open message (CRLF or LF line ends)."""
    found: set[str] = set()
    current: bytes | None = None
    seen = 0

    def flush(field: bytes | None) -> None:
        if field is None:
            return
        name, sep, value = field.partition(b":")
        if sep and name.strip().lower() == b"delivered-to":
            v = value.decode("utf-8", "replace").strip()
            if v.startswith("<") and v.endswith(">"):
                v = v[1:-1].strip()
            found.add(v.lower())

    while seen < MAX_HEADER_SCAN:
        line = f.readline(65536)
        if not line:
            break
        seen += len(line)
        stripped = line.rstrip(b"\r\n")
        if not stripped:
            break
        if stripped[:1] in (b" ", b"\t") and current is not None:
            current += b" " + stripped.strip()
        else:
            flush(current)
            current = stripped
    flush(current)
    return found


#: A queued message up to this size is read and converted to LF line ends
#: once per delivery round, then written to each recipient from memory
#: (one pass over the recipients); a bigger one is streamed per recipient.
PRELOAD_LIMIT = CHUNK_SIZE


class QueuedMessage:
    """
    The queued message of one delivery round, as each Maildir copy gets
    it (LF line ends): read once into memory when it is at most
    L{PRELOAD_LIMIT} bytes, so five recipients cost one read and one
    conversion, not five; streamed from C{path} otherwise.
    """

    def __init__(self, path: str, crlf_only: bool = False) -> None:
        """
        @param crlf_only: every CR and LF of the message is part of a CRLF
            (C{esmtp["crlf"]} of its envelope): the LF copy is then made by
            deleting the CRs (C{bytes.translate}, 0.75 ms per MB here)
            instead of replacing each CRLF (2.1 ms per MB).
        """
        self.path = path
        self.crlf_only = crlf_only
        self.body: bytes | None = None
        with open_message(path) as f:
            if f.length <= PRELOAD_LIMIT:
                raw = f.read()
                self.body = raw.translate(None, b"\r") if crlf_only else raw.replace(b"\r\n", b"\n")
            #: the Delivered-To addresses already in the header (loop detection)
            self.delivered_to = _delivered_to(f if self.body is None else io.BytesIO(self.body))

    def write_to(self, out: BinaryIO) -> int:
        """Write the message to C{out}; returns the bytes written."""
        if self.body is not None:
            out.write(self.body)
            return len(self.body)
        with open_message(self.path) as src:
            return copy_lf(src, out, crlf_only=self.crlf_only)


def copy_lf(src: BinaryIO, dst: BinaryIO, chunk_size: int | None = None, crlf_only: bool = False) -> int:
    """
    Copy C{src} to C{dst} in chunks, turning CRLF into LF (Maildir files use
    the local line ending, as Postfix local(8) writes them).  A CR at the end
    of a chunk is held back so a CRLF split across two reads is still seen.
    Returns the number of bytes written.  C{crlf_only}: see L{QueuedMessage}.
    """
    size = CHUNK_SIZE if chunk_size is None else chunk_size
    written = 0
    if crlf_only:
        while chunk := src.read(size):
            data = chunk.translate(None, b"\r")
            dst.write(data)
            written += len(data)
        return written
    held = b""
    while True:
        chunk = src.read(size)
        if not chunk:
            break
        data = held + chunk
        if data.endswith(b"\r"):
            data, held = data[:-1], b"\r"
        else:
            held = b""
        data = data.replace(b"\r\n", b"\n")
        dst.write(data)
        written += len(data)
    if held:
        dst.write(held)
        written += len(held)
    return written


class LocalDelivery:
    """
    The delivery agent for local recipients: one Maildir file per recipient.

    @param directory: maps final addresses to Maildirs.
    @param hostname: used in unique file names.
    @param run: runs the blocking file work and returns a Deferred:
        C{deferToThread} in production, a synchronous runner in tests.
    @param fsync: C{False} only for tests that do not measure durability.
    """

    def __init__(
        self,
        directory: Directory,
        hostname: str,
        run: Callable[..., defer.Deferred] = threads.deferToThread,
        fsync: bool = True,
    ) -> None:
        self.directory = directory
        self.hostname = hostname
        self.run = run
        self.fsync = fsync
        self._host = _maildir_host(hostname)
        self._syncs_lock = threading.Lock()
        self._syncs: dict[object, DirSync] = {}
        self._recipient_pool: ThreadPoolExecutor | None = None

    # -- the DeliveryAgent interface ---------------------------------------------------

    def deliver(self, envelope: Envelope, recipients: list[Recipient], message_path: str) -> defer.Deferred:
        """
        Deliver the message at C{message_path} to each of C{recipients}.
        Fires with one L{Outcome} per recipient, in order; never errbacks:
        an unexpected failure is a temporary outcome for everyone.
        """
        addresses = [r.address for r in recipients]
        d = self.run(
            self._deliver_all, envelope.queue_id, envelope.arrival, envelope.sender, addresses, message_path,
            bool(envelope.esmtp.get("crlf")),
        )

        def failed(f: Failure) -> list[Outcome]:
            log.failure("local delivery of {queue_id} failed", f, queue_id=envelope.queue_id)
            return [Outcome.temporary(a, "local delivery failed: internal error", 451, "4.3.0") for a in addresses]

        return d.addErrback(failed)

    # -- blocking work ------------------------------------------------------------------

    def _deliver_all(
        self, queue_id: str, arrival: float, sender: str, addresses: Iterable[str], message_path: str,
        crlf_only: bool = False,
    ) -> list[Outcome]:
        addresses = list(addresses)
        try:
            message = QueuedMessage(message_path, crlf_only)
        except OSError as e:
            return [self._os_error(a, e, "cannot read queued message") for a in addresses]
        except QueueFileError as e:
            return [Outcome.temporary(a, f"cannot read queued message: {e}", 451, "4.3.0") for a in addresses]
        seen = message.delivered_to

        def one(a: str) -> Outcome:
            try:
                return self._deliver_one(queue_id, arrival, sender, a, message, seen)
            except Exception:
                log.failure("local delivery to {address} failed", address=a)
                return Outcome.temporary(a, "local delivery failed: internal error", 451, "4.3.0")

        if (
            len(addresses) < 2
            or not self.fsync
            or getattr(self.directory, "mode", "virtual") == "system"
            or len({a.lower() for a in addresses}) < len(addresses)  # one file name, written once
        ):
            return [one(a) for a in addresses]
        # Several mailboxes: their files are written and fsync'd at the
        # same time, so the file system commits them together (one journal
        # commit for all, where one after the other cost one each: 5
        # recipients took five times as long to deliver as one).  System
        # mode stays sequential: it writes as root into the users' homes.
        if self._recipient_pool is None:
            self._recipient_pool = ThreadPoolExecutor(PARALLEL_RECIPIENTS, thread_name_prefix="mailhub-maildir")
        return list(self._recipient_pool.map(one, addresses))

    def _deliver_one(
        self, queue_id: str, arrival: float, sender: str, address: str, message: "QueuedMessage", seen: set[str]
    ) -> Outcome:
        if address.lower() in seen:
            return Outcome.permanent(address, "mail forwarding loop for " + address, 554, "5.4.6")
        unique = self._unique(queue_id, arrival, address)
        if getattr(self.directory, "mode", "virtual") == "system":
            return self._deliver_system(unique, sender, address, message)
        try:
            root, domain, local = self.directory.mailbox_location(address)
        except InvalidMailbox as e:
            return Outcome.permanent(address, e.text, e.code, e.enhanced)
        except RecipientError as e:
            return Outcome.temporary(address, e.text, 451, "4.3.5")
        return self._open_and_write(
            lambda: system.open_virtual_maildir(
                root, domain, local, self.directory.may_create(address), self.fsync
            ),
            unique, sender, address, message,
        )

    def _deliver_system(self, unique: str, sender: str, address: str, message: "QueuedMessage") -> Outcome:
        """
        System mode: C{~user/Maildir}, written by root and given to the
        account (see L{mailhub.delivery.system} and L{_write_fds}).
        """
        try:
            account = self.directory.account_for(address)
        except UnknownRecipient:
            return Outcome.permanent(address, "User unknown in local recipient table", 550, "5.1.1")
        except InvalidMailbox as e:
            return Outcome.permanent(address, e.text, e.code, e.enhanced)
        except RecipientError as e:
            return Outcome.temporary(address, e.text, 451, "4.3.5")
        return self._open_and_write(
            lambda: system.open_maildir(account, self.directory.home_maildir, self.fsync),
            unique, sender, address, message,
        )

    def _open_and_write(
        self, open_maildir: Callable[[], system.MaildirFds], unique: str, sender: str, address: str,
        message: "QueuedMessage",
    ) -> Outcome:
        """
        The one way both modes write a Maildir file: every directory opened
        without following a link (L{system.open_below}), the file written by
        descriptor (L{_write_fds}); file-system errors become outcomes.
        """
        try:
            with open_maildir() as fds:
                self._write_fds(fds, unique, sender, address, message)
        except system.NoMailbox:
            return Outcome.permanent(address, "User unknown in local recipient table", 550, "5.1.1")
        except system.UnsafeLocation as e:  # logged with the path by system
            return Outcome.temporary(address, f"mailbox location not allowed: {e}", 451, "4.3.5")
        except OSError as e:
            return self._os_error(address, e, "cannot write to maildir")
        return Outcome.delivered(address, "delivered to maildir")

    def _os_error(self, address: str, e: OSError, what: str) -> Outcome:
        """Postfix treats every file-system error as soft: mail is kept and retried."""
        text = f"{what}: {e.strerror or e}"
        if e.errno in _QUOTA_ERRNOS:
            return Outcome.temporary(address, f"mailbox full: {e.strerror}", 452, "4.2.2")
        if e.errno == errno.ENOSPC:
            return Outcome.temporary(address, f"mail system full: {e.strerror}", 452, "4.3.1")
        if e.errno in _PERMISSION_ERRNOS:
            return Outcome.temporary(address, text, 451, "4.2.0")
        return Outcome.temporary(address, text, 451, "4.3.0")

    def _unique(self, queue_id: str, arrival: float, address: str) -> str:
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

    def _fill(self, fd: int, sender: str, address: str, message: "QueuedMessage") -> int:
        """
        Write the Maildir copy into the new file C{fd} (closed here, also
        on error) and fsync it; returns its size.
        """
        try:
            out = os.fdopen(fd, "wb", buffering=CHUNK_SIZE)
        except BaseException:
            os.close(fd)
            raise
        with out:
            size = self._write_header_and_body(out, sender, address, message)
            out.flush()
            if self.fsync:
                os.fsync(out.fileno())
        return size

    def _write_header_and_body(self, out: BinaryIO, sender: str, address: str, message: "QueuedMessage") -> int:
        header = (
            b"Return-Path: <" + _header_value(sender) + b">\n"
            b"Delivered-To: " + _header_value(address) + b"\n"
        )
        out.write(header)
        return len(header) + message.write_to(out)

    def _write_fds(self, fds: system.MaildirFds, unique: str, sender: str, address: str, message: "QueuedMessage") -> None:
        """
        Write one Maildir file into a Maildir opened by L{system.open_below}:
        created in tmp/ (C{O_EXCL | O_NOFOLLOW}), written, fsync'd, linked
        into new/, new/ fsync'd.  If this exact delivery is already in new/
        (or was moved to cur/ by a reader) nothing is added.  Every name is
        relative to a directory descriptor and nothing is followed; in
        system mode the new file is given to the recipient (C{fchown})
        before a byte is written, so quota and ownership are the
        recipient's, and what the user can rename in their own tmp/ is
        never written or chowned by path.
        """
        try:
            os.unlink(unique, dir_fd=fds.tmp)  # ours, left by a crash (or whatever the user put there)
        except FileNotFoundError:
            pass
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(unique, flags, 0o600, dir_fd=fds.tmp)
        try:
            try:
                system.give(fd, fds.uid, fds.gid)
            except BaseException:
                os.close(fd)
                raise
            size = self._fill(fd, sender, address, message)
            name = f"{unique},S={size}"
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
        except BaseException:
            try:
                os.unlink(unique, dir_fd=fds.tmp)
            except OSError:
                pass
            raise
        if self.fsync:
            # keyed by inode, not path: the user owns the path; the fsync
            # is made on a descriptor the leader holds, of that same inode
            st = os.fstat(fds.new)
            new_fd = fds.new
            self._sync_new((st.st_dev, st.st_ino), lambda: os.fsync(new_fd))


#: The flag sets probed in cur/ for an already delivered message (an already delivered copy that a reader moved, see L{LocalDelivery._write_fds}).
_CUR_FLAGS = ("", "S", "RS", "FS", "T", "ST")


def _exists_at(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True
