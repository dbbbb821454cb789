"""
Local delivery: the delivery agent that copies a queued message into
recipients' Maildirs.

Owns: L{LocalDelivery} (the agent: for each recipient, find its Maildir
through the directory, open it, have it written, and turn what happened --
file-system errors too -- into one L{Outcome} per recipient: agents return
outcomes, the scheduler decides), the forwarding-loop check
(C{Delivered-To} already in the header), and the queued message as each
Maildir copy gets it (L{QueuedMessage}, L{copy_lf}: LF line ends, read
once per round when small).

Both modes open the Maildir the same way (L{mailhub.delivery.system.open_below}: no
symlink followed below the mailbox root or the home directory, every
directory opened relative to its parent's descriptor) and have the file
written by descriptor (L{mailhub.delivery.maildir.MaildirWriter}).  Virtual
mode: C{<mailboxes>/<domain>/<user>}
(L{mailhub.delivery.system.open_virtual_maildir}).  System mode (C{directory.mode ==
"system"}): C{~user/Maildir} (L{mailhub.delivery.system.open_maildir}, directories
owned by the user); each new file is C{fchown}ed to the recipient before
it is written.

Must not touch: the Maildir file names and commit order (L{mailhub.delivery.maildir}),
the spool (the message file is only read), retry decisions
(the scheduler's), alias and mailbox lookups (the directory's), the
reactor (file work runs through the injected C{run}, a thread by default).
Logs nothing per recipient: the scheduler logs outcomes.
"""

from __future__ import annotations

import errno
import io
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailhub.delivery import system
from mailhub.delivery.directory import Directory
from mailhub.delivery.errors import InvalidMailbox, RecipientError, UnknownRecipient
from mailhub.delivery.maildir import MaildirWriter
from mailhub.envelope import Envelope, Outcome, Recipient, ReportFunction
from mailhub.queue.durable import FILE_SYSTEMS
from mailhub.queue.queuefile import QueueFileError, open_message

__all__ = ["LocalDelivery", "QueuedMessage", "copy_lf", "delivered_to_addresses", "CHUNK_SIZE"]

log = Logger()

#: Bytes read from the spool per read; the message is never read whole.
CHUNK_SIZE = 1 << 20

#: Recipients of one message whose Maildir files are written at once (see
#: L{LocalDelivery._deliver_all}).
PARALLEL_RECIPIENTS = 8

#: Header bytes scanned for Delivered-To before giving up (the header section
#: of a sane message is far smaller; a hostile one must not cost memory).
MAX_HEADER_SCAN = 1 << 20

_QUOTA_ERRNOS = {getattr(errno, "EDQUOT", -1)}
_PERMISSION_ERRNOS = {errno.EACCES, errno.EPERM}


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
    @param sync: C{spool.sync}: C{"syncfs"} makes each file durable with
        the group C{syncfs()} of its file system instead of two fsyncs.
    """

    def __init__(
        self,
        directory: Directory,
        hostname: str,
        run: Callable[..., defer.Deferred] = threads.deferToThread,
        fsync: bool = True,
        sync: str = "fsync",
    ) -> None:
        self.directory = directory
        self.hostname = hostname
        self.run = run
        self.fsync = fsync
        #: writes the Maildir files (names, tmp/ -> new/, fsync)
        self.maildir = MaildirWriter(hostname, fsync, FILE_SYSTEMS if sync == "syncfs" else None)
        self._recipient_pool: ThreadPoolExecutor | None = None

    # -- the DeliveryAgent interface ---------------------------------------------------

    def deliver(
        self, envelope: Envelope, recipients: list[Recipient], message_path: str, report: ReportFunction
    ) -> defer.Deferred:
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
        self, queue_id: str, arrival: float, sender: str, address: str, message: QueuedMessage, seen: set[str]
    ) -> Outcome:
        if address.lower() in seen:
            return Outcome.permanent(address, "mail forwarding loop for " + address, 554, "5.4.6")
        unique = self.maildir.unique(queue_id, arrival, address)
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

    def _deliver_system(self, unique: str, sender: str, address: str, message: QueuedMessage) -> Outcome:
        """
        System mode: C{~user/Maildir}, written by root and given to the
        account (see L{mailhub.delivery.system} and L{MaildirWriter.write}).
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
        message: QueuedMessage,
    ) -> Outcome:
        """
        The one way both modes write a Maildir file: every directory opened
        without following a link (L{system.open_below}), the file written by
        descriptor (L{MaildirWriter.write}); file-system errors become outcomes.
        """
        try:
            with open_maildir() as fds:
                self.maildir.write(fds, unique, sender, address, message)
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
