"""
The queue on disk: one file per queued message, as Postfix keeps it.

Owns: the spool directory and every file in it.  A message is queued when,
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

Readers of a queued message open it with L{open_message}, which stops at
the end of the message: nothing may read a queue file to its end.

Must not touch: the reactor, clocks, the network.  Calls are synchronous
and thread-safe; callers decide in which thread they run.  The only thread
of its own is the remover (L{Spool.remove}), which exits when idle.
"""

from __future__ import annotations

import fcntl
import io
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator

from twisted.logger import Logger

from mailhub.envelope import Envelope, EnvelopeFormatError

__all__ = [
    "Spool", "SpoolWriter", "DirSync", "MessageFile", "QueueFileError", "fsync_dir", "new_queue_id",
    "is_queue_id", "open_message", "queue_file_bytes", "queue_file_trailer", "MEMORY_LIMIT", "FOOTER_SIZE",
]

log = Logger()

_ID_ALPHABET = "0123456789ABCDEFGHJKLMNPQRSTVWXYZ"


def new_queue_id(now: float | None = None) -> str:
    """
    A new queue id: 11 characters of microseconds since the epoch (so ids
    sort by arrival) and 6 random ones, from an alphabet that is safe in a
    file name and unambiguous to read aloud.
    """
    micro = int((time.time() if now is None else now) * 1_000_000)
    head = []
    for _ in range(11):
        micro, digit = divmod(micro, len(_ID_ALPHABET))
        head.append(_ID_ALPHABET[digit])
    # One getrandom() call, not six (secrets.choice asks the kernel each
    # time, and this runs on the reactor thread).  The bias of 64 random
    # bits reduced mod 33**6 is below 2**-33: irrelevant for uniqueness.
    rand = int.from_bytes(secrets.token_bytes(8), "big")
    tail = []
    for _ in range(6):
        rand, digit = divmod(rand, len(_ID_ALPHABET))
        tail.append(_ID_ALPHABET[digit])
    return "".join(reversed(head)) + "".join(tail)


#: 8 to 64 characters of the alphabet (a regular expression: called three
#: times per envelope at startup, where a character loop cost seconds for
#: 100 000 queued messages).
_QUEUE_ID = re.compile("[" + re.escape(_ID_ALPHABET) + "]{8,64}")


def is_queue_id(text: str) -> bool:
    """Whether C{text} could be a queue id (used to refuse path tricks)."""
    return _QUEUE_ID.fullmatch(text) is not None


def _fsync_dir(path: str) -> None:
    """fsync a directory, so the renames and unlinks in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: The same, for the other modules that write durably (local.py, pickup.py).
fsync_dir = _fsync_dir

class DirSync:
    """
    Group commit of one directory's fsync, shared by threads.

    A thread that has just renamed (or linked, or unlinked) a name in the
    directory calls L{sync}; it returns once an fsync of the directory that
    I{began after that call} has completed, so it covers the caller's
    change.  If no fsync is running the caller starts one; if one is
    running (it may have begun before the caller's rename) the caller waits
    for it to end and then for the next one, which one of the waiters
    starts and which covers all of them.  N concurrent committers therefore
    cost about two fsyncs, not N.  An fsync error is raised in every
    caller that relied on that fsync.

    @param path: the directory, opened for each fsync; or C{None} when
        every caller passes its own C{fsync} callable (a descriptor it holds).
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self._cond = threading.Condition(threading.Lock())
        self._started = 0  # generation of the last fsync begun
        self._done = 0  # generation of the last fsync ended
        self._running = False
        self._errors: dict[int, BaseException] = {}
        #: fsyncs really made (for tests and the benchmark's curiosity)
        self.fsyncs = 0

    def sync(self, fsync: Callable[[], None] | None = None, patience: float = 0.0) -> None:
        """
        Return when the directory is durable as of this call; raise if that
        fsync failed.

        @param patience: seconds to wait for another thread to start the
            covering fsync before starting one.  For work that is not
            waited for by a client (the spool's remover): under load it
            then rides on the commits' fsyncs and adds none of its own.
        """
        with self._cond:
            target = self._started + 1  # the first fsync to begin after now
            deadline = None
            while self._done < target:
                if self._running:
                    self._cond.wait()
                    continue
                if patience <= 0:
                    break
                if deadline is None:
                    deadline = time.monotonic() + patience
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._done >= target:
                error = self._errors.get(target)
                if error is not None:
                    raise error
                return
            # nobody is syncing and our change is not covered: lead
            self._running = True
            self._started += 1
            gen = self._started
        error = None
        try:
            if fsync is not None:
                fsync()
            else:
                assert self.path is not None
                _fsync_dir(self.path)
        except BaseException as e:
            error = e
        with self._cond:
            self._running = False
            self._done = gen
            self.fsyncs += 1
            if error is not None:
                self._errors[gen] = error
            for old in [g for g in self._errors if g < gen - 1000]:
                del self._errors[old]
            self._cond.notify_all()
        if error is not None:
            raise error


#: Seconds the remover waits for a commit's fsync of queue/ to ride on
#: before it makes its own (and lingers, idle, before its thread ends).
REMOVER_PATIENCE = 0.05

#: A message smaller than this is kept in memory until its commit (which
#: runs in a worker thread) and written there: the reactor thread makes no
#: file system call for it.  Larger ones go to tmp/ as they arrive.
MEMORY_LIMIT = 64 * 1024

#: The footer that ends every queue file: the message's length and the
#: envelope's, in hexadecimal, so a reader finds both with one read from
#: the end.  Fixed size (FOOTER_SIZE bytes).
_FOOTER = b"\n#mailhub-queue 2 %016x %08x\n"
_FOOTER_RE = re.compile(rb"\n#mailhub-queue 2 ([0-9a-f]{16}) ([0-9a-f]{8})\n")
FOOTER_SIZE = len(_FOOTER % (0, 0))

#: Bytes read from the end of a queue file to find its envelope in one
#: read (an envelope with a handful of recipients is well under this).
_TAIL_READ = 8192


class QueueFileError(ValueError):
    """A file in queue/ that is not a complete queue file."""


def queue_file_trailer(message_length: int, envelope: Envelope) -> bytes:
    """
    What follows the message in its queue file: the envelope and the
    footer.  (Public for tools that build a queue by hand: the benchmark's
    backlog, tests.)
    """
    env = envelope.to_json()
    return env + _FOOTER % (message_length, len(env))


def queue_file_bytes(message: bytes, envelope: Envelope) -> bytes:
    """A whole queue file for C{message} (tools and tests that build one by hand)."""
    return message + queue_file_trailer(len(message), envelope)


def _read_trailer(fd: int, size: int) -> tuple[int, bytes]:
    """
    The message length and the envelope bytes of the open queue file
    C{fd} of C{size} bytes.

    @raise QueueFileError: no valid footer, or lengths that do not add up.
    """
    if size < FOOTER_SIZE:
        raise QueueFileError(f"{size} bytes, shorter than a footer")
    start = max(0, size - _TAIL_READ)
    tail = os.pread(fd, size - start, start)
    m = _FOOTER_RE.fullmatch(tail, len(tail) - FOOTER_SIZE)
    if m is None:
        raise QueueFileError("no queue file footer")
    length, env_length = int(m.group(1), 16), int(m.group(2), 16)
    if length + env_length + FOOTER_SIZE != size:
        raise QueueFileError(f"lengths {length}+{env_length} do not match the file size {size}")
    env_start = length - start  # in tail
    if env_start >= 0:
        return length, tail[env_start : len(tail) - FOOTER_SIZE]
    return length, os.pread(fd, env_length, length)


class _MessageSlice(io.RawIOBase):
    """The first C{length} bytes of an open queue file, as a raw stream."""

    def __init__(self, fd: int, length: int) -> None:
        super().__init__()
        self._fd = fd
        self._length = length
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        want = min(len(buffer), self._length - self._pos)
        if want <= 0:
            return 0
        got = os.preadv(self._fd, [memoryview(buffer)[:want]], self._pos)
        self._pos += got
        return got

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            try:
                os.close(self._fd)
            finally:
                super().close()


class MessageFile(io.BufferedReader):
    """
    A queued message opened for reading (L{open_message}): a buffered
    binary file that ends where the message ends.

    @ivar length: the message's size in bytes (what C{fstat} would say of
        a file holding only the message).
    """

    length: int


def open_message(path: str) -> MessageFile:
    """
    Open the queue file at C{path} for reading its message.

    @raise OSError: it cannot be opened (e.g. FileNotFoundError: removed).
    @raise QueueFileError: it is not a complete queue file.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        length, _ = _read_trailer(fd, os.fstat(fd).st_size)
    except BaseException:
        os.close(fd)
        raise
    f = MessageFile(_MessageSlice(fd, length), CHUNK)
    f.length = length
    return f


#: Read buffer of L{open_message} files.
CHUNK = 64 * 1024


def _write_file(path: str, data: bytes, sync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class SpoolWriter:
    """
    A message being received.  Up to L{MEMORY_LIMIT} bytes are kept in
    memory (most mail is small, and the commit then does all the file work,
    one write of message, envelope and footer, in its worker thread);
    beyond that, everything goes to a file in C{tmp/} as it arrives, so
    memory stays bounded whatever the message size.
    """

    def __init__(self, spool: "Spool", queue_id: str) -> None:
        self.spool = spool
        self.queue_id = queue_id
        self.size = 0
        self._tmp = os.path.join(spool.path, "tmp", queue_id + ".msg")
        self._buffer: list[bytes] | None = []
        self._buffered = 0
        self._file = None
        self._closed = False

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
        view = memoryview(data)
        while view:
            view = view[self._file.write(view) :]

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
                _write_file(self._tmp, b"".join(pending + [trailer]), self.spool.fsync)
            else:
                self._write_raw(trailer)
                if self.spool.fsync:
                    os.fsync(self._file.fileno())
                self._file.close()
                self._closed = True
            self.spool._commit(self._tmp, envelope.queue_id)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Throw the message away (client quit, size exceeded, error)."""
        self._buffer = None
        if not self._closed:
            self._closed = True
            if self._file is None:
                return  # nothing was written to disk
            self._file.close()
        _unlink_quietly(self._tmp)


class Spool:
    """
    The spool directory.  Creating a L{Spool} creates its directories.

    @param fsync: C{False} only for tests that do not measure durability.
    """

    def __init__(self, path: str, fsync: bool = True) -> None:
        self.path = os.path.abspath(path)
        self.fsync = fsync
        for sub in ("tmp", "queue", "envelopes", "corrupt"):
            os.makedirs(os.path.join(self.path, sub), mode=0o700, exist_ok=True)
        #: group commits of the two directories whose renames matter
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
        @raise QueueFileError: the file is damaged.
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
            _unlink_quietly(final)
            raise

    def _write_envelope(self, envelope: Envelope) -> None:
        qid = envelope.queue_id
        tmp = os.path.join(self.path, "tmp", qid + ".env")
        _unlink_quietly(tmp)
        try:
            _write_file(tmp, envelope.to_json(), self.fsync)
            os.rename(tmp, self.envelope_path(qid))
        except BaseException:
            _unlink_quietly(tmp)
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
        env = Envelope.from_json(raw)
        if env.queue_id != queue_id:
            raise EnvelopeFormatError("queue_id does not match the file name")
        return env

    def _queued_envelope(self, queue_id: str) -> bytes:
        """The envelope bytes in the queue file (KeyError: none; EnvelopeFormatError: bad file)."""
        try:
            fd = os.open(self.message_path(queue_id), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise KeyError(queue_id)
        try:
            return _read_trailer(fd, os.fstat(fd).st_size)[1]
        except QueueFileError as e:
            raise EnvelopeFormatError(f"bad queue file: {e}")
        finally:
            os.close(fd)

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

    def _quarantine(self, path: str, why: str) -> None:
        target = os.path.join(self.path, "corrupt", os.path.basename(path))
        if os.path.exists(target):
            target += "." + secrets.token_hex(4)
        os.rename(path, target)
        log.error("spool: moved {path} to {target}: {why}", path=path, target=target, why=why)

    def _conversion_lock(self, blocking: bool) -> int:
        """
        An exclusive C{flock} on C{SPOOL/convert.lock}, held while the first
        layout is converted and C{tmp/} is emptied at start-up, so the
        daemon and a queue tool never convert (or clean up) at once.

        @raise BlockingIOError: C{blocking} is false and another process holds it.
        """
        fd = os.open(os.path.join(self.path, "convert.lock"), os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def migrate(self, blocking: bool = True) -> int:
        """
        Convert messages queued in the first spool layout (C{new/ID} and
        C{envelopes/ID.json}, mailhub before queue files) into queue files;
        return how many.  Runs under L{_conversion_lock} (see there for
        C{blocking}).
        """
        if not os.path.isdir(os.path.join(self.path, "new")):
            return 0
        lock = self._conversion_lock(blocking)
        try:
            return self._migrate()
        finally:
            os.close(lock)

    def _migrate(self) -> int:
        """
        L{migrate}, its lock held.  Each message is written and made durable
        in C{queue/} before its old files go, so a crash meanwhile leaves
        both copies and the next run deletes C{new/ID}, and the envelope
        file only if it is still the copy of the one in the queue file (if
        it differs, the daemon has updated it since: it stays, as the
        message's changed envelope).  A message in C{new/} without an envelope was never
        committed and is deleted; an unreadable envelope goes to
        C{corrupt/} with its message.  C{new/} is removed when empty, so
        this costs one C{stat} afterwards.
        """
        new = os.path.join(self.path, "new")
        try:
            names = sorted(os.listdir(new))
        except FileNotFoundError:
            return 0
        queued = set(os.listdir(os.path.join(self.path, "queue")))
        moved: list[str] = []
        for name in names:
            old = os.path.join(new, name)
            if name in queued:
                continue  # converted before a crash: only new/ID is left to delete
            if not is_queue_id(name):
                self._quarantine(old, "not a queue id")
                continue
            try:
                with open(self.envelope_path(name), "rb") as f:
                    env = Envelope.from_json(f.read())
                if env.queue_id != name:
                    raise EnvelopeFormatError("queue_id does not match the file name")
            except FileNotFoundError:
                self._unlink_logged(old)  # never committed
                continue
            except (EnvelopeFormatError, OSError) as e:
                self._quarantine(self.envelope_path(name), f"unreadable envelope: {e}")
                self._quarantine(old, "message of an unreadable envelope")
                continue
            tmp = os.path.join(self.path, "tmp", name + ".convert")
            _unlink_quietly(tmp)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
            try:
                try:
                    dst_file = os.fdopen(fd, "wb")
                except BaseException:
                    os.close(fd)
                    raise
                # dst first: if old/ID cannot be opened, dst is still closed
                with dst_file as dst, open(old, "rb") as src:
                    length = 0
                    while chunk := src.read(CHUNK):
                        dst.write(chunk)
                        length += len(chunk)
                    dst.write(queue_file_trailer(length, env))
                    dst.flush()
                    if self.fsync:
                        os.fsync(dst.fileno())
                # link, not rename: never replaces a queue file that is already there
                os.link(tmp, self.message_path(name))
            except FileExistsError:
                queued.add(name)
                continue
            except IsADirectoryError:
                self._quarantine(old, "not a regular file")
                self._quarantine(self.envelope_path(name), "envelope of an unreadable message")
                continue
            finally:
                _unlink_quietly(tmp)
            moved.append(name)
        if self.fsync:
            _fsync_dir(os.path.join(self.path, "queue"))
        # Now every message of new/ is durable in queue/ (or was never
        # committed): the old files go.  The envelope of a message converted
        # just now only repeats the copy in its queue file.
        for name in moved:
            self._unlink_logged(self.envelope_path(name))
        for name in names:
            if name in queued and name not in moved:
                self._drop_envelope_copy(name)
        for name in names:
            if name in moved or name in queued:
                self._unlink_logged(os.path.join(new, name))
        if self.fsync:
            _fsync_dir(os.path.join(self.path, "envelopes"))
        self._unlink_logged(new, os.rmdir)
        if moved:
            log.info("spool: converted {count} message(s) to queue files", count=len(moved))
        return len(moved)

    def _drop_envelope_copy(self, queue_id: str) -> None:
        """
        Delete C{envelopes/ID.json} of a message converted before a crash
        if it is byte for byte the envelope in its queue file (the old
        envelope, which the conversion would have deleted); one that
        differs is the daemon's later update and stays.
        """
        try:
            with open(self.envelope_path(queue_id), "rb") as f:
                copy = f.read()
            queued = self._queued_envelope(queue_id)
        except (OSError, KeyError, EnvelopeFormatError):
            return
        if copy == queued:
            self._unlink_logged(self.envelope_path(queue_id))

    def _unlink_logged(self, path: str, remove: Callable[[str], None] = os.unlink) -> None:
        """C{remove(path)}; a failure other than "already gone" is logged, not raised."""
        try:
            remove(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.error("spool: cannot remove {path}: {error}", path=path, error=e)

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
        lock = self._conversion_lock(blocking=True)  # a queue tool may be converting
        try:
            tmp = os.path.join(self.path, "tmp")
            for name in os.listdir(tmp):
                try:
                    os.unlink(os.path.join(tmp, name))
                except IsADirectoryError:
                    pass
            self._migrate()
        finally:
            os.close(lock)
        pending = []
        envelopes = set(os.listdir(os.path.join(self.path, "envelopes")))  # one listing, not a stat per message
        queued = set()
        for name in sorted(os.listdir(os.path.join(self.path, "queue"))):
            path = self.message_path(name)
            if not is_queue_id(name):
                self._quarantine(path, "not a queue file name")
                continue
            try:
                if name + ".json" in envelopes:
                    env = self.load(name)
                else:
                    env = Envelope.from_json(self._queued_envelope(name))
                    if env.queue_id != name:
                        raise EnvelopeFormatError("queue_id does not match the file name")
            except KeyError:
                continue  # gone meanwhile (removed by the queue tool)
            except (EnvelopeFormatError, OSError) as e:
                self._quarantine(path, f"unreadable: {e}")
                if name + ".json" in envelopes:
                    self._quarantine(self.envelope_path(name), "envelope of an unreadable message")
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
                self._quarantine(os.path.join(self.path, "envelopes", entry), "not an envelope file name")
            elif qid not in queued:
                # the queue file's unlink was durable, this one's was not
                _unlink_quietly(self.envelope_path(qid))
                log.info("spool: removed the envelope of {queue_id}, whose message was already removed", queue_id=qid)
        self.drain()
        if self.fsync:
            _fsync_dir(os.path.join(self.path, "envelopes"))
        return pending
