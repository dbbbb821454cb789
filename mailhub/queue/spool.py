"""
The queue on disk: one file per queued message, as Postfix keeps it.

Owns: the spool directory and every file in it -- committing a message
(L{SpoolWriter}), updating its envelope, removing it, listing and loading
the queue, and recovering it at start-up.  The bytes of one queue file are
L{mailhub.queue.queuefile}'s; the conversion of the first layout is
L{mailhub.queue.migration}'s; the fsync steps are L{mailhub.queue.durable}'s.  A message is queued when,
and only when, its queue file exists in C{queue/}; everything before that
rename can be thrown away after a crash because no 250 was given.

Layout (see docs/spool.rst)::

    SPOOL/tmp/               files being written: ID.msg, ID.env (emptied at startup)
    SPOOL/queue/ID           the queue file: the message bytes exactly as
                             received, then the envelope as it was at the
                             commit (one JSON line), then a 44-byte footer
                             giving both lengths; never changed after commit
    SPOOL/envelopes/ID.json  the envelope, once it changed after the commit
                             (it then replaces the copy in the queue file)
    SPOOL/corrupt/           unreadable queue files and envelopes, moved, never deleted

Commit: the message, its envelope and the footer are written to C{tmp/},
fsync'd, renamed into C{queue/}, and C{queue/} is fsync'd: one file, one
create, two fsyncs (the first layout, a message file and an envelope file,
needed two creates and four fsyncs; see docs/performance.rst).  The rename
is the commit point.  Directory fsyncs are group commits (L{DirSync}):
concurrent commits in worker threads share one fsync of C{queue/}.
With C{spool.sync = "syncfs"} (L{Spool}'s C{sync}) no file is fsync'd on
its own: the rename is followed by one C{syncfs()} of the spool's file
system, shared by every commit, envelope update and Maildir delivery of
that instant (L{mailhub.queue.durable.FileSystemSync}).

An envelope that changes later (an attempt made, a recipient delivered) is
written to C{envelopes/ID.json} the same way (C{tmp/}, fsync, rename,
fsync of C{envelopes/}).  Removal unlinks the queue file first; only a
message that has such an envelope waits for that unlink to be durable
before its envelope goes (riding on the commits' fsync of C{queue/}), so a
crash can leave an envelope without its queue file (recovery deletes it:
the message was removed) but never revive a message with a stale
envelope.  Unlinks run in the spool's own remover thread, so the caller
(the reactor thread) makes no syscall; until they are done the message is
hidden from L{Spool.load}, L{Spool.queue_ids} and L{Spool.update} in this
process.

Readers of a queued message open it with
L{mailhub.queue.queuefile.open_message}, which stops at the end of the
message: nothing may read a queue file to its end.

Must not touch: the reactor, clocks, the network.  Calls are synchronous
and thread-safe; callers decide in which thread they run.  The only thread
of its own is the remover (L{Spool.remove}), which exits when idle.
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
import threading
from collections.abc import Iterable, Iterator

from twisted.logger import Logger

from mailhub.envelope import Envelope, EnvelopeFormatError
from mailhub.queue import migration
from mailhub.queue.durable import DirSync, SyncFSDir, unlink_quietly, write_file
from mailhub.queue.queuefile import (
    MessageFile,
    is_queue_id,
    new_queue_id,
    open_message,
    parse_envelope,
    queue_file_trailer,
    read_queued_envelope,
)

__all__ = ["Spool", "SpoolWriter", "MEMORY_LIMIT", "REMOVER_PATIENCE", "SYNC_MODES"]

#: The values of C{spool.sync}.
SYNC_MODES = ("fsync", "syncfs")

log = Logger()


#: Seconds the remover waits for a commit's fsync of queue/ to ride on
#: before it makes its own (and lingers, idle, before its thread ends).
REMOVER_PATIENCE = 0.05

#: A message smaller than this is kept in memory until its commit (which
#: runs in a worker thread) and written there: the reactor thread makes no
#: file system call for it.  Larger ones go to tmp/ as they arrive.
MEMORY_LIMIT = 64 * 1024


class SpoolWriter:
    """
    A message being received.  Up to L{MEMORY_LIMIT} bytes are kept in
    memory (most mail is small, and the commit then does all the file work,
    one write of message, envelope and footer, in its worker thread);
    beyond that, everything goes to a file in C{tmp/} as it arrives, so
    memory stays bounded whatever the message size.
    """

    def __init__(self, spool: Spool, queue_id: str) -> None:
        self.spool = spool
        self.queue_id = queue_id
        self.size = 0
        self._tmp = os.path.join(spool.path, "tmp", queue_id + ".msg")
        self._buffer: list[bytes] | None = []
        self._buffered = 0
        self._file: io.FileIO | None = None  # once the message is past MEMORY_LIMIT
        self._closed = False
        self._prefix = b""  # header fields prepended by the end-of-data checks
        # the start of the content replaced by the end-of-data checks: the
        # first _skip bytes written are left out, _head stands in for them
        self._skip = 0
        self._head = b""

    def _open(self) -> None:
        # os.open: the file is 0600 whatever the umask (open() would give 0666 & ~umask)
        fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            self._file = os.fdopen(fd, "wb", buffering=0)
        except BaseException:
            os.close(fd)
            raise
        pending, self._buffer = self._buffer or [], None
        self._write_raw(b"".join(pending))

    def _write_raw(self, data: bytes) -> None:
        # An unbuffered file may write less than asked (e.g. disk nearly
        # full): loop, or the message is silently truncated.
        file = self._file
        assert file is not None  # _open() has run
        view = memoryview(data)
        while view:
            view = view[file.write(view) :]

    def write(self, data: bytes) -> None:
        """Append C{data}.  Raises C{OSError} (e.g. ENOSPC) to the caller."""
        if self._closed:
            raise ValueError("message already committed or aborted")
        if self._buffer is not None:
            if self._buffered + len(data) <= MEMORY_LIMIT:
                self._buffer.append(bytes(data))
                self._buffered += len(data)
                self.size += len(data)
                return
            self._open()
        self._write_raw(data)
        self.size += len(data)

    def prepend(self, data: bytes) -> None:
        """
        Put C{data} before everything written so far (and before what an
        earlier call prepended).  It becomes part of the file at the
        commit: a spilled message is then copied once behind it.
        """
        if self._closed:
            raise ValueError("message already committed or aborted")
        self._prefix = bytes(data) + self._prefix
        self.size += len(data)

    def replace_start(self, length: int, data: bytes) -> None:
        """
        Put C{data} in place of the first C{length} bytes of the content
        (as L{chunks} shows it): how the end-of-data checks delete header
        fields.  Like L{prepend}, it reaches the file only at the commit.
        """
        if self._closed:
            raise ValueError("message already committed or aborted")
        if length < 0 or length > self.size - len(self._prefix):
            raise ValueError("replaced range is outside the content")
        if length >= len(self._head):
            self._skip += length - len(self._head)
            self._head = bytes(data)
        else:
            self._head = bytes(data) + self._head[length:]
        self.size += len(data) - length

    def chunks(self, size: int = MEMORY_LIMIT) -> Iterator[bytes]:
        """The content so far (not the prepended fields; with a replaced start), in chunks of at most C{size} bytes."""
        if self._head:
            yield self._head
        skip = self._skip
        for chunk in self._raw_chunks(size):
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            yield chunk[skip:]
            skip = 0

    def _raw_chunks(self, size: int) -> Iterator[bytes]:
        """The bytes written so far, in chunks of at most C{size} bytes (a buffered message: as written)."""
        if self._closed:
            raise ValueError("message already committed or aborted")
        if self._buffer is not None:
            yield from list(self._buffer)
            return
        left = self.size - len(self._prefix) - len(self._head) + self._skip
        with open(self._tmp, "rb") as file:
            while left > 0:
                chunk = file.read(min(size, left))
                if not chunk:
                    return
                left -= len(chunk)
                yield chunk

    def rewrite(self, chunks: Iterable[bytes]) -> None:
        """
        Replace everything written so far (not the prepended fields) with
        C{chunks}, which may be read from this writer's own L{chunks}: the
        new content goes to a second file (or memory, up to
        L{MEMORY_LIMIT}) and takes the old one's place when complete, so
        memory stays bounded whatever the size.  Durability is the
        commit's, as for L{write}.  On an exception the old content stays.
        """
        if self._closed:
            raise ValueError("message already committed or aborted")
        prefix = len(self._prefix)
        other = SpoolWriter(self.spool, self.queue_id)
        other._tmp = self._tmp + ".new"
        try:
            for chunk in chunks:
                other.write(chunk)
        except BaseException:
            other.abort()
            raise
        if self._file is not None:
            self._file.close()
            self._file = None
            unlink_quietly(self._tmp)
        if other._file is not None:
            other._file.close()
            os.rename(other._tmp, self._tmp)
            self._file = open(self._tmp, "ab", buffering=0)  # noqa: SIM115 -- closed at commit/abort
            self._buffer = None
        else:
            self._buffer, self._buffered = other._buffer, other._buffered
        other._closed = True
        self._skip, self._head = 0, b""  # the new content already has the replaced start
        self.size = other.size + prefix

    def message_chunks(self, size: int = MEMORY_LIMIT) -> Iterator[bytes]:
        """
        The message as its queue file will hold it: the prepended header
        fields, then everything written (L{chunks}).  Deliver on accept
        (L{mailhub.delivery.direct}) copies it into Maildirs from here.
        """
        if self._prefix:
            yield self._prefix
        yield from self.chunks(size)

    def commit(self, envelope: Envelope) -> None:
        """
        Make the message durable and queued.  When this returns without an
        exception the caller may answer 250; any exception means nothing is
        queued (the temporary file is removed) and the answer must be 4xx.
        """
        if envelope.queue_id != self.queue_id:
            raise ValueError("envelope is for another message")
        if self._closed:
            raise ValueError("message already committed or aborted")
        trailer = queue_file_trailer(self.size, envelope)
        try:
            if self._file is None:
                pending, self._buffer = self._buffer or [], None
                self._closed = True
                content = b"".join(pending)
                if self._skip or self._head:
                    content = self._head + content[self._skip :]
                write_file(self._tmp, b"".join([self._prefix, content, trailer]), self.spool.fsync_files)
            elif self._prefix or self._skip or self._head:
                self._write_raw(trailer)
                self._file.close()
                self._closed = True
                self._copy_behind_prefix()
            else:
                self._write_raw(trailer)
                if self.spool.fsync_files:
                    os.fsync(self._file.fileno())
                self._file.close()
                self._closed = True
            self.spool._commit(self._tmp, envelope.queue_id)
        except BaseException:
            self.abort()
            raise

    def _copy_behind_prefix(self) -> None:
        """Rewrite the spilled file as prefix + new start + its bytes after the replaced start (fsync'd when the spool syncs)."""
        final = self._tmp + ".p"
        fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            with os.fdopen(fd, "wb") as out, open(self._tmp, "rb") as source:
                out.write(self._prefix + self._head)
                source.seek(self._skip)
                shutil.copyfileobj(source, out, 1024 * 1024)
                out.flush()
                if self.spool.fsync_files:
                    os.fsync(out.fileno())
            os.replace(final, self._tmp)
        except BaseException:
            unlink_quietly(final)
            raise

    def abort(self) -> None:
        """Throw the message away (client quit, size exceeded, error)."""
        self._buffer = None
        if not self._closed:
            self._closed = True
            if self._file is None:
                return  # nothing was written to disk
            self._file.close()
        unlink_quietly(self._tmp)


class Spool:
    """
    The spool directory.  Creating a L{Spool} creates its directories.

    @param fsync: C{False} only for tests that do not measure durability.
    @param sync: how a commit is made durable (C{spool.sync}): C{"fsync"},
        each file and then its directory; C{"syncfs"}, no per-file fsync,
        one group C{syncfs()} of the spool's file system instead of each
        directory fsync (L{mailhub.queue.durable.SyncFSDir}).
    """

    def __init__(self, path: str, fsync: bool = True, sync: str = "fsync") -> None:
        if sync not in SYNC_MODES:
            raise ValueError(f"unknown sync mode {sync!r}")
        self.path = os.path.abspath(path)
        self.fsync = fsync
        self.sync = sync
        #: files are fsync'd one by one before their rename (not with syncfs)
        self.fsync_files = fsync and sync == "fsync"
        for sub in ("tmp", "queue", "envelopes", "corrupt"):
            os.makedirs(os.path.join(self.path, sub), mode=0o700, exist_ok=True)
        #: group commits of the two directories whose renames matter
        self.queue_sync: DirSync | SyncFSDir
        self.envelopes_sync: DirSync | SyncFSDir
        if sync == "syncfs":
            self.queue_sync = SyncFSDir(os.path.join(self.path, "queue"))
            self.envelopes_sync = SyncFSDir(os.path.join(self.path, "envelopes"))
        else:
            self.queue_sync = DirSync(os.path.join(self.path, "queue"))
            self.envelopes_sync = DirSync(os.path.join(self.path, "envelopes"))
        # removal: ids hidden from load/queue_ids/update whose files the
        # remover thread deletes
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._removing: set[str] = set()
        self._to_remove: list[str] = []
        self._remover: threading.Thread | None = None
        self._draining = 0  # threads in drain(): the remover must not dawdle

    # -- paths ------------------------------------------------------------------

    def message_path(self, queue_id: str) -> str:
        """The queue file; read its message with L{open_message}, never to its end."""
        return os.path.join(self.path, "queue", queue_id)

    def envelope_path(self, queue_id: str) -> str:
        """Where the envelope goes once it changed after the commit."""
        return os.path.join(self.path, "envelopes", queue_id + ".json")

    def open_message(self, queue_id: str) -> MessageFile:
        """
        L{open_message} of a queued message.

        @raise KeyError: not a queue id (a path trick), or no such message.
        @raise mailhub.queue.queuefile.QueueFileError: the file is damaged.
        """
        if not is_queue_id(queue_id):
            raise KeyError(queue_id)
        try:
            return open_message(self.message_path(queue_id))
        except FileNotFoundError:
            raise KeyError(queue_id)

    # -- writing ------------------------------------------------------------------

    def new_message(self) -> SpoolWriter:
        """Start receiving a message under a fresh queue id."""
        return SpoolWriter(self, new_queue_id())

    def _commit(self, tmp: str, queue_id: str) -> None:
        final = self.message_path(queue_id)
        os.rename(tmp, final)
        try:
            if self.fsync:
                self.queue_sync.sync()
        except BaseException:
            # Nothing may stay queued when commit fails (the client gets a 4xx).
            unlink_quietly(final)
            raise

    def _write_envelope(self, envelope: Envelope) -> None:
        qid = envelope.queue_id
        tmp = os.path.join(self.path, "tmp", qid + ".env")
        unlink_quietly(tmp)
        try:
            write_file(tmp, envelope.to_json(), self.fsync_files)
            os.rename(tmp, self.envelope_path(qid))
        except BaseException:
            unlink_quietly(tmp)
            raise
        if self.fsync:
            self.envelopes_sync.sync()

    def add(self, envelope: Envelope, message: bytes) -> None:
        """Queue a whole message at once (bounces, tests)."""
        writer = SpoolWriter(self, envelope.queue_id)
        try:
            writer.write(message)
        except BaseException:
            writer.abort()
            raise
        writer.commit(envelope)

    def update(self, envelope: Envelope) -> None:
        """
        Atomically replace the envelope of a queued message.

        @raise KeyError: the message is gone (removed meanwhile); writing an
            envelope without its message would leave a ghost in the queue.
        """
        qid = envelope.queue_id
        with self._lock:
            if qid in self._removing:
                raise KeyError(qid)
        if not os.path.exists(self.message_path(qid)):
            raise KeyError(qid)
        self._write_envelope(envelope)

    def remove(self, queue_id: str) -> None:
        """
        Dequeue a message: it is no longer queued for this process when
        this returns (L{load}, L{queue_ids} and L{update} no longer see it).
        The files go in the remover thread: the queue file first; then, if
        the message has an envelope file, that one, but only after an fsync
        of C{queue/} has made the queue file's unlink durable (shared,
        L{DirSync}, with concurrent commits), so a crash can never bring
        the message back with its first envelope once a later one is gone.
        The caller, usually the reactor thread, makes no syscall and waits
        for no fsync (with C{fsync=False} the unlinks happen here).  A
        queue file that cannot be unlinked is logged and stays queued on
        disk (it is found again at the next start).

        Nothing here makes the removal itself durable before returning:
        after a crash the message may be back, and its recipients are tried
        again (local delivery recognises its own Maildir file; remote
        delivery is at least once, as with Postfix).  See docs/spool.rst.
        """
        if not is_queue_id(queue_id):
            raise KeyError(queue_id)
        with self._lock:
            if queue_id in self._removing:
                return
            self._removing.add(queue_id)
            if self.fsync:
                self._to_remove.append(queue_id)
                self._idle.notify_all()  # wake a lingering remover
                if self._remover is None:
                    # Not a daemon thread: a short-lived process (the queue
                    # tool) finishes its removals before it exits.
                    self._remover = threading.Thread(target=self._remove_files, name="mailhub-spool-remover")
                    self._remover.start()
                return
        try:
            for path in (self.message_path(queue_id), self.envelope_path(queue_id)):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        finally:
            with self._lock:
                self._removing.discard(queue_id)

    def _remove_files(self) -> None:
        """The remover thread: unlink queue files, then (after an fsync of queue/) their envelope files."""
        while True:
            with self._lock:
                if not self._to_remove and not self._draining:
                    # linger a little: starting a thread per message costs more
                    self._idle.wait(REMOVER_PATIENCE)
                batch, self._to_remove = self._to_remove, []
                patience = 0.0 if self._draining else REMOVER_PATIENCE
                if not batch:
                    self._remover = None
                    self._idle.notify_all()
                    return
            updated = []
            for qid in batch:
                has_envelope = os.path.exists(self.envelope_path(qid))
                try:
                    os.unlink(self.message_path(qid))
                except FileNotFoundError:
                    pass
                except OSError as e:
                    # still queued on disk: it comes back at the next start
                    log.error("spool: cannot remove queue file {queue_id}: {error}", queue_id=qid, error=e)
                    with self._lock:
                        self._removing.discard(qid)
                    continue
                if has_envelope:
                    updated.append(qid)
                else:
                    with self._lock:
                        self._removing.discard(qid)
            if not updated:
                continue
            try:
                self.queue_sync.sync(patience=patience)
            except OSError as e:
                # the queue files' removal may not be durable: keep their
                # envelopes (recover() deletes them once they are orphans)
                log.error("spool: cannot sync queue/, {count} envelope file(s) kept: {error}", count=len(updated), error=e)
                with self._lock:
                    self._removing.difference_update(updated)
                continue
            for qid in updated:
                try:
                    os.unlink(self.envelope_path(qid))
                except FileNotFoundError:
                    pass
                except OSError as e:
                    log.error("spool: cannot remove envelope {queue_id}: {error}", queue_id=qid, error=e)
            with self._lock:
                self._removing.difference_update(updated)

    def drain(self) -> None:
        """Wait until every removed message's files are gone (tests, shutdown, recovery)."""
        with self._lock:
            self._draining += 1
            try:
                self._idle.notify_all()
                while self._remover is not None:
                    self._idle.wait()
            finally:
                self._draining -= 1

    # -- reading ------------------------------------------------------------------

    def load(self, queue_id: str) -> Envelope:
        """
        Read one envelope: its envelope file if it changed after the
        commit, else the one in its queue file.

        @raise KeyError: no such message.
        @raise EnvelopeFormatError: not a valid envelope or queue file.
        """
        if not is_queue_id(queue_id) or queue_id in self._removing:
            raise KeyError(queue_id)
        try:
            with open(self.envelope_path(queue_id), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raw = self._queued_envelope(queue_id)
        return parse_envelope(raw, queue_id)

    def _queued_envelope(self, queue_id: str) -> bytes:
        """The envelope bytes in the queue file (KeyError: none; EnvelopeFormatError: bad file)."""
        try:
            return read_queued_envelope(self.message_path(queue_id))
        except FileNotFoundError:
            raise KeyError(queue_id)

    def queue_ids(self) -> list[str]:
        """Ids of all queued messages, oldest first."""
        ids = [name for name in os.listdir(os.path.join(self.path, "queue")) if is_queue_id(name)]
        with self._lock:
            removing = set(self._removing)
        return sorted(i for i in ids if i not in removing)

    def __iter__(self) -> Iterator[Envelope]:
        for qid in self.queue_ids():
            try:
                yield self.load(qid)
            except (KeyError, EnvelopeFormatError):
                continue

    # -- startup ------------------------------------------------------------------

    def quarantine(self, path: str, why: str) -> None:
        """Move the unreadable file C{path} to C{corrupt/} (never over another) and log why."""
        target = os.path.join(self.path, "corrupt", os.path.basename(path))
        if os.path.exists(target):
            target += "." + secrets.token_hex(4)
        os.rename(path, target)
        log.error("spool: moved {path} to {target}: {why}", path=path, target=target, why=why)

    def migrate(self, blocking: bool = True) -> int:
        """
        Convert messages queued in the first spool layout into queue files;
        return how many (L{mailhub.queue.migration.migrate}).

        @raise BlockingIOError: C{blocking} is false and another process
            holds the conversion lock.
        """
        return migration.migrate(self, blocking)

    def recover(self) -> list[Envelope]:
        """
        Make the spool consistent after a start or a crash and return every
        queued envelope that still has pending recipients.

        - C{tmp/} is emptied: nothing in it was ever acknowledged.
        - messages of the first spool layout are converted (L{migrate}).
        - a queue file that cannot be read, or whose envelope cannot, is
          moved to C{corrupt/} (with that envelope) and logged, never deleted.
        - an envelope file without its queue file is what a crash during
          removal leaves: deleted.
        - a message with no pending recipient (crash during removal) is
          removed.
        """
        self.drain()
        lock = migration.conversion_lock(self.path, blocking=True)  # a queue tool may be converting
        try:
            tmp = os.path.join(self.path, "tmp")
            for name in os.listdir(tmp):
                try:
                    os.unlink(os.path.join(tmp, name))
                except IsADirectoryError:
                    pass
            migration.convert(self)
        finally:
            os.close(lock)
        pending = []
        envelopes = set(os.listdir(os.path.join(self.path, "envelopes")))  # one listing, not a stat per message
        queued = set()
        for name in sorted(os.listdir(os.path.join(self.path, "queue"))):
            path = self.message_path(name)
            if not is_queue_id(name):
                self.quarantine(path, "not a queue file name")
                continue
            try:
                if name + ".json" in envelopes:
                    env = self.load(name)
                else:
                    env = parse_envelope(self._queued_envelope(name), name)
            except KeyError:
                continue  # gone meanwhile (removed by the queue tool)
            except (EnvelopeFormatError, OSError) as e:
                self.quarantine(path, f"unreadable: {e}")
                if name + ".json" in envelopes:
                    self.quarantine(self.envelope_path(name), "envelope of an unreadable message")
                    envelopes.discard(name + ".json")
                continue
            queued.add(name)
            if env.done:
                self.remove(name)
                continue
            pending.append(env)
        for entry in sorted(envelopes):
            qid = entry[:-5] if entry.endswith(".json") else ""
            if not is_queue_id(qid):
                self.quarantine(os.path.join(self.path, "envelopes", entry), "not an envelope file name")
            elif qid not in queued:
                # the queue file's unlink was durable, this one's was not
                unlink_quietly(self.envelope_path(qid))
                log.info("spool: removed the envelope of {queue_id}, whose message was already removed", queue_id=qid)
        self.drain()
        if self.fsync:
            self.envelopes_sync.sync()
        return pending
