"""
The writer of deliver on accept: the Maildir files of the messages that
finish at the same instant, written by one thread and made durable
together (a group commit).

Owns: L{BatchWriter} -- one thread that takes every L{Placement} waiting,
writes all their files in tmp/, then fsyncs them all at once (a few
helper threads: the disk overlaps concurrent fsyncs), then links them
into new/ (the steps of L{MaildirWriter.place}), then makes each distinct new/ durable
once (its fsync; with C{spool.sync = "syncfs"} one C{syncfs()} per file
system: L{MaildirWriter.sync_new}), and only then answers every
placement in the reactor thread -- and L{Placement}, one message's files:
the message as each Maildir copy gets it (L{AcceptedMessage}, read from
the L{SpoolWriter} that received it, the same bytes its queue file would
hold, converted exactly as L{mailhub.delivery.local.QueuedMessage}
converts a queued message), the forwarding-loop check, and what
happened per recipient.  A recipient whose file could not be written or
whose new/ could not be made durable is "not placed" with the reason;
the committer (L{mailhub.delivery.direct}) queues the message for it.

Why one writer: per-file fsyncs in series are the cost of a Maildir
delivery; one writer lets every message finishing in the same instant
share the fsync of new/ (or the one C{syncfs()}) and issues the round's
file fsyncs together, which the disk overlaps (measured here: ten 4 KB
files fsync'd one after the other 47-65 ms, at the same time 5-10 ms).

Must not touch: which path a message takes, the mail log, the envelope
(L{mailhub.delivery.direct}); the spool's files (the received message is
only read, and thrown away once every copy is durable); Maildir names
and commit order (L{mailhub.delivery.maildir}).  The reactor is only
called through the injected C{call_from_thread}.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

from twisted.internet import defer
from twisted.logger import Logger

from mailhub.delivery import system
from mailhub.delivery.local import CHUNK_SIZE, PRELOAD_LIMIT, _delivered_to, copy_lf
from mailhub.delivery.maildir import MaildirWriter, Pending
from mailhub.queue.spool import SpoolWriter

__all__ = ["BatchWriter", "Placement", "Target", "AcceptedMessage", "LINGER"]

log = Logger()

#: Seconds the writer thread waits for more work before it ends.
LINGER = 1.0

#: fsyncs of one round made at the same time.
SYNC_THREADS = 16

#: At most this many files per round (each holds its Maildir's descriptors open until the round ends).
MAX_ROUND = 128


class _ChunkReader(io.RawIOBase):
    """A readable stream over an iterator of byte chunks."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._left = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._left:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._left = chunk
        n = min(len(buffer), len(self._left))
        buffer[:n] = self._left[:n]
        self._left = self._left[n:]
        return n


class AcceptedMessage:
    """
    A message just received, as each Maildir copy gets it (LF line ends):
    byte for byte what L{mailhub.delivery.local.QueuedMessage} makes of
    its queue file.  Kept in memory up to L{PRELOAD_LIMIT} bytes, else
    streamed from the writer's file for each copy.
    """

    def __init__(self, writer: SpoolWriter, crlf_only: bool) -> None:
        self.writer = writer
        self.crlf_only = crlf_only
        self.body: bytes | None = None
        if writer.size <= PRELOAD_LIMIT:
            raw = b"".join(writer.message_chunks())
            self.body = raw.translate(None, b"\r") if crlf_only else raw.replace(b"\r\n", b"\n")
            #: the Delivered-To addresses already in the header (loop detection)
            self.delivered_to = _delivered_to(io.BytesIO(self.body))
        else:
            with self._open() as f:
                self.delivered_to = _delivered_to(f)

    def _open(self) -> io.BufferedReader:
        return io.BufferedReader(_ChunkReader(self.writer.message_chunks(CHUNK_SIZE)), CHUNK_SIZE)

    def write_to(self, out: BinaryIO) -> int:
        """Write the message to C{out}; returns the bytes written."""
        if self.body is not None:
            out.write(self.body)
            return len(self.body)
        with self._open() as src:
            return copy_lf(src, out, crlf_only=self.crlf_only)


@dataclass(frozen=True)
class Target:
    """One recipient's Maildir, looked up by the directory in the reactor thread."""

    address: str
    root: str
    domain: str
    local: str
    may_create: bool


class Placement:
    """
    One message's Maildir files, written in the writer thread.

    After the batch: L{placed} (addresses whose file is durable) and
    L{failed} (address -> why not); C{deferred} fires with C{self} in
    the reactor thread.  When every copy is durable the received message
    is thrown away (the writer's file, if it spilled to disk).
    """

    def __init__(
        self, queue_id: str, arrival: float, sender: str, targets: list[Target], writer: SpoolWriter,
        crlf_only: bool,
    ) -> None:
        self.queue_id = queue_id
        self.arrival = arrival
        self.sender = sender
        self.targets = targets
        self.writer = writer
        self.crlf_only = crlf_only
        self.placed: list[str] = []
        self.failed: dict[str, str] = {}
        self._pending: list[tuple[str, Pending]] = []  # written, not yet published
        self._open: list[tuple[str, system.MaildirFds, Any]] = []  # (address, fds, sync key)
        self.answered = False  # the answer is on its way to the reactor thread
        self.deferred: defer.Deferred[Placement] = defer.Deferred()

    # -- in the writer thread ------------------------------------------------------------

    def prepare(self, maildir: MaildirWriter) -> None:
        """Create and write every recipient's file in tmp/ (not yet fsync'd: see L{BatchWriter})."""
        try:
            message = AcceptedMessage(self.writer, self.crlf_only)
        except OSError as e:
            self._fail_all(f"cannot read the received message: {e.strerror or e}")
            return
        for t in self.targets:
            if t.address.lower() in message.delivered_to:
                self.failed[t.address] = "mail forwarding loop"
                continue
            try:
                fds = system.open_virtual_maildir(t.root, t.domain, t.local, t.may_create, maildir.fsync)
            except system.NoMailbox:
                self.failed[t.address] = "no mailbox"
                continue
            except OSError as e:  # UnsafeLocation too (logged with the path by system)
                self.failed[t.address] = f"cannot open the maildir: {e.strerror or e}"
                continue
            try:
                unique = maildir.unique(self.queue_id, self.arrival, t.address)
                pending = maildir.prepare(fds, unique, self.sender, t.address, message)
            except OSError as e:
                fds.close()
                self.failed[t.address] = f"cannot write to maildir: {e.strerror or e}"
                continue
            self._pending.append((t.address, pending))

    def files(self) -> list[tuple[str, Pending]]:
        """(address, file) of every file written and not failed: what the round must fsync."""
        return [(a, pending) for a, pending in self._pending if a not in self.failed]

    def not_durable(self, maildir: MaildirWriter, address: str, pending: Pending, e: OSError) -> None:
        """The fsync of C{address}'s file failed: drop it."""
        self._drop(maildir, address, pending, f"cannot write to maildir: {e.strerror or e}")

    def publish(self, maildir: MaildirWriter) -> None:
        """Link every durable file into its new/ (durable once the batch has synced new/)."""
        for address, pending in self._pending:
            if address in self.failed:
                continue
            try:
                maildir.publish(pending)
                key = maildir.sync_key(pending.fds)
            except OSError as e:
                self._drop(maildir, address, pending, f"cannot write to maildir: {e.strerror or e}")
                continue
            self._open.append((address, pending.fds, key))
        self._pending = []

    def _drop(self, maildir: MaildirWriter, address: str, pending: Pending, why: str) -> None:
        maildir.discard(pending)
        pending.fds.close()
        self.failed[address] = why

    def syncs(self) -> list[tuple[Any, system.MaildirFds]]:
        """(sync key, descriptors) of every file placed: what the batch must make durable."""
        return [(key, fds) for _, fds, key in self._open]

    def finish(self, unsynced: set[Any]) -> None:
        """The batch's syncs are done (C{unsynced}: the keys whose sync failed): record, close, clean up."""
        for address, fds, key in self._open:
            fds.close()
            if key in unsynced:
                self.failed[address] = "cannot make the maildir durable"
            else:
                self.placed.append(address)
        self._open = []
        if not self.failed:
            self.writer.abort()  # every copy is durable: the received message is not needed

    def _fail_all(self, why: str) -> None:
        for _, pending in self._pending:
            if not pending.out.closed:
                pending.out.close()
            pending.fds.close()
        self._pending = []
        for _, fds, _key in self._open:
            fds.close()
        self._open = []
        self.placed = []
        for t in self.targets:
            self.failed[t.address] = why


def _start_thread(run: Callable[[], None]) -> None:
    threading.Thread(target=run, name="mailhub-direct-writer", daemon=True).start()


class BatchWriter:
    """
    The writer thread (started when work arrives, ended after L{LINGER}
    idle seconds).  Each round takes every placement waiting: while one
    round writes, the next gathers the messages that finish meanwhile.

    @param maildir: writes the files and syncs new/ (fsync or syncfs).
    @param call_from_thread: the reactor's C{callFromThread}; answers go
        through it.
    @param start: how to run the writer loop (a new thread; tests run it
        in the caller).
    """

    def __init__(
        self,
        maildir: MaildirWriter,
        call_from_thread: Callable[..., Any],
        start: Callable[[Callable[[], None]], None] = _start_thread,
        linger: float = LINGER,
    ) -> None:
        self.maildir = maildir
        self.call_from_thread = call_from_thread
        self.start = start
        self.linger = linger
        self._cond = threading.Condition(threading.Lock())
        self._waiting: list[Placement] = []
        self._running = False
        self._pool: ThreadPoolExecutor | None = None  # the round's concurrent fsyncs
        #: rounds written and directory syncs made (tests, the benchmark's curiosity)
        self.rounds = 0
        self.syncs = 0

    def submit(self, placement: Placement) -> defer.Deferred[Placement]:
        """Have C{placement} written in the next round; its Deferred fires in the reactor thread."""
        with self._cond:
            self._waiting.append(placement)
            if self._running:
                self._cond.notify()
                return placement.deferred
            self._running = True
        self.start(self._loop)
        return placement.deferred

    def _take(self) -> list[Placement]:
        """The next round: the placements waiting, up to L{MAX_ROUND} files (open descriptors)."""
        files = 0
        for n, p in enumerate(self._waiting):
            files += len(p.targets)
            if files > MAX_ROUND and n:
                batch, self._waiting = self._waiting[:n], self._waiting[n:]
                return batch
        batch, self._waiting = self._waiting, []
        return batch

    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._waiting and self.linger > 0:
                    self._cond.wait(self.linger)
                if not self._waiting:
                    self._running = False
                    return
                batch = self._take()
            try:
                self._write(batch)
            except BaseException:  # never leave a client without its answer
                log.failure("deliver on accept: the writer failed")
                for p in batch:
                    if not p.answered:
                        p.answered = True
                        p._fail_all("internal error")
                        self.call_from_thread(p.deferred.callback, p)

    def _each(self, batch: list[Placement], step: Callable[[Placement, MaildirWriter], None]) -> None:
        for p in batch:
            try:
                step(p, self.maildir)
            except Exception:
                log.failure("{queue_id}: deliver on accept failed", queue_id=p.queue_id)
                p._fail_all("internal error")

    def _parallel(self, sync: Callable[[Any], None], items: list[Any]) -> list[OSError | None]:
        """
        C{sync(item)} for every item, at the same time (the disk overlaps
        concurrent fsyncs; one after the other each waits for the last);
        the error of each, or C{None}.
        """

        def one(item: Any) -> OSError | None:
            try:
                sync(item)
            except OSError as e:
                return e
            return None

        if len(items) < 2:
            return [one(item) for item in items]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="mailhub-direct-sync")
        return list(self._pool.map(one, items))

    def _write(self, batch: list[Placement]) -> None:
        """
        One round: every file written, then every file fsync'd (at the
        same time: L{_parallel}), then every file linked, then each new/
        synced once (at the same time), then the answers.
        """
        self.rounds += 1
        maildir = self.maildir
        self._each(batch, Placement.prepare)
        files = [(p, address, pending) for p in batch for address, pending in p.files()]
        errors = self._parallel(maildir.make_durable, [f[2] for f in files])
        for (p, address, pending), error in zip(files, errors, strict=True):
            if error is not None:
                p.not_durable(maildir, address, pending, error)
        self._each(batch, Placement.publish)
        unsynced: set[Any] = set()
        if maildir.fsync:
            groups: dict[Any, system.MaildirFds] = {}
            for p in batch:
                for key, fds in p.syncs():
                    groups.setdefault(key, fds)
            errors = self._parallel(maildir.sync_new, list(groups.values()))
            for (key, fds), error in zip(groups.items(), errors, strict=True):
                if error is not None:
                    log.error("deliver on accept: cannot sync {path}/new: {error}", path=fds.path, error=error)
                    unsynced.add(key)
            self.syncs += len(groups)
        for p in batch:
            try:
                p.finish(unsynced)
            except Exception:
                log.failure("{queue_id}: deliver on accept failed", queue_id=p.queue_id)
                p._fail_all("internal error")
            p.answered = True
            self.call_from_thread(p.deferred.callback, p)
