"""
The queue on disk: a Maildir-style spool of messages and their envelopes.

Owns: the spool directory and every file in it.  A message is queued when,
and only when, its envelope file exists in C{envelopes/}; everything before
that rename can be thrown away after a crash because no 250 was given.

Layout (see docs/spool.rst)::

    SPOOL/tmp/            files being written: ID.msg, ID.env (cleaned at startup)
    SPOOL/new/ID          committed message bytes, never changed after commit
    SPOOL/envelopes/ID.json  the envelope; its rename is the commit point
    SPOOL/corrupt/        unreadable envelopes and orphans, moved, never deleted

Commit order: message fsync'd in tmp/, renamed into new/, new/ fsync'd;
envelope fsync'd in tmp/, renamed into envelopes/, envelopes/ fsync'd.
Directory fsyncs are group commits (L{DirSync}): concurrent commits in
worker threads share one fsync of new/ and one of envelopes/.
Removal order is the reverse: envelope first, then message; the message
file goes only after the envelope's unlink is durable.  Both unlinks run in
the spool's own remover thread, so the caller (the reactor thread) makes no
syscall; until they are done the message is hidden from L{Spool.load},
L{Spool.queue_ids} and L{Spool.update} in this process.

Must not touch: the reactor, clocks, the network.  Calls are synchronous
and thread-safe; callers decide in which thread they run.  The only thread
of its own is the remover (L{Spool.remove}), which exits when idle.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator

from twisted.logger import Logger

from .envelope import Envelope, EnvelopeFormatError

__all__ = ["Spool", "SpoolWriter", "DirSync", "fsync_dir", "new_queue_id", "is_queue_id", "MEMORY_LIMIT"]

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


#: Seconds the remover waits for a commit's fsync of envelopes/ to ride on
#: before it makes its own (and lingers, idle, before its thread ends).
REMOVER_PATIENCE = 0.05

#: A message smaller than this is kept in memory until its commit (which
#: runs in a worker thread) and written there: the reactor thread makes no
#: file system call for it.  Larger ones go to tmp/ as they arrive.
MEMORY_LIMIT = 64 * 1024


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


class SpoolWriter:
    """
    A message being received.  Up to L{MEMORY_LIMIT} bytes are kept in
    memory (most mail is small, and the commit then does all the file work
    in its worker thread); beyond that, everything goes to a file in
    C{tmp/} as it arrives, so memory stays bounded whatever the message size.
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
        self._file = open(self._tmp, "xb", buffering=0)
        pending, self._buffer = self._buffer or [], None
        for chunk in pending:
            self._write_raw(chunk)

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
        queued (the temporary files are removed) and the answer must be 4xx.
        """
        if envelope.queue_id != self.queue_id:
            raise ValueError("envelope is for another message")
        try:
            if self._file is None:
                self._open()
            if self.spool.fsync:
                os.fsync(self._file.fileno())
            self._file.close()
            self._closed = True
            self.spool._commit(self._tmp, envelope)
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
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass


class Spool:
    """
    The spool directory.  Creating a L{Spool} creates its directories.

    @param fsync: C{False} only for tests that do not measure durability.
    """

    def __init__(self, path: str, fsync: bool = True) -> None:
        self.path = os.path.abspath(path)
        self.fsync = fsync
        for sub in ("tmp", "new", "envelopes", "corrupt"):
            os.makedirs(os.path.join(self.path, sub), mode=0o700, exist_ok=True)
        #: group commits of the two directories whose renames matter
        self.new_sync = DirSync(os.path.join(self.path, "new"))
        self.envelopes_sync = DirSync(os.path.join(self.path, "envelopes"))
        # removal: ids whose envelope is gone (or going) and whose message
        # the remover thread deletes once that is durable
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._removing: set[str] = set()
        self._to_remove: list[str] = []
        self._remover: threading.Thread | None = None
        self._draining = 0  # threads in drain(): the remover must not dawdle

    # -- paths ------------------------------------------------------------------

    def message_path(self, queue_id: str) -> str:
        return os.path.join(self.path, "new", queue_id)

    def envelope_path(self, queue_id: str) -> str:
        return os.path.join(self.path, "envelopes", queue_id + ".json")

    # -- writing ------------------------------------------------------------------

    def new_message(self) -> SpoolWriter:
        """Start receiving a message under a fresh queue id."""
        return SpoolWriter(self, new_queue_id())

    def _commit(self, tmp_message: str, envelope: Envelope) -> None:
        qid = envelope.queue_id
        os.rename(tmp_message, self.message_path(qid))
        try:
            if self.fsync:
                self.new_sync.sync()
            self._write_envelope(envelope)
        except BaseException:
            # Nothing may stay queued when commit fails (the client gets a
            # 4xx): the envelope too, if the failure came after its rename.
            for path in (self.envelope_path(qid), self.message_path(qid)):
                try:
                    os.unlink(path)
                except OSError:
                    pass
            raise

    def _write_envelope(self, envelope: Envelope) -> None:
        qid = envelope.queue_id
        tmp = os.path.join(self.path, "tmp", qid + ".env")
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        try:
            _write_file(tmp, envelope.to_json(), self.fsync)
            os.rename(tmp, self.envelope_path(qid))
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
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
        this returns (L{load}, L{queue_ids} and L{update} no longer see it);
        the files go in the remover thread, the envelope first, then the
        message only after an fsync of C{envelopes/} has made the
        envelope's unlink durable -- so a crash leaves an orphan message
        (deleted by L{recover}), never an envelope without its message.
        That fsync is shared (L{DirSync}) with concurrent commits, and the
        caller, usually the reactor thread, makes no syscall and waits for
        no fsync at all (with C{fsync=False} both unlinks happen here).
        An envelope that cannot be unlinked is logged and stays queued on
        disk (it is found again at the next start).

        Nothing here makes the envelope's removal itself durable before
        returning: after a crash it may be back, and its recipients are
        tried again (local delivery recognises its own Maildir file; remote
        delivery is at least once, as with Postfix).  See docs/spool.rst.
        """
        if not is_queue_id(queue_id):
            raise KeyError(queue_id)
        with self._lock:
            if queue_id in self._removing:
                return
            self._removing.add(queue_id)
            if self.fsync:
                # Everything, the envelope's unlink included, in the remover
                # thread: an unlink costs the event loop about 0.3 ms on a
                # VM.  Meanwhile _removing hides the message from load,
                # queue_ids and update, so it is dequeued for this process
                # when this returns.
                self._to_remove.append(queue_id)
                self._idle.notify_all()  # wake a lingering remover
                if self._remover is None:
                    # Not a daemon thread: a short-lived process (the queue
                    # tool) finishes its removals before it exits.
                    self._remover = threading.Thread(target=self._remove_messages, name="mailhub-spool-remover")
                    self._remover.start()
                return
        try:
            os.unlink(self.envelope_path(queue_id))
        except FileNotFoundError:
            pass
        except BaseException:
            with self._lock:
                self._removing.discard(queue_id)
            raise
        if not self.fsync:
            try:
                os.unlink(self.message_path(queue_id))
            except FileNotFoundError:
                pass
            finally:
                with self._lock:
                    self._removing.discard(queue_id)
            return
        with self._lock:
            self._to_remove.append(queue_id)
            self._idle.notify_all()  # wake a lingering remover
            if self._remover is None:
                # Not a daemon thread: a short-lived process (the queue
                # tool) finishes its removals before it exits.
                self._remover = threading.Thread(target=self._remove_messages, name="mailhub-spool-remover")
                self._remover.start()

    def _remove_messages(self) -> None:
        """The remover thread: unlink envelopes, fsync envelopes/, then unlink the messages it covers."""
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
            gone = []
            for qid in batch:
                try:
                    os.unlink(self.envelope_path(qid))
                except FileNotFoundError:
                    pass
                except OSError as e:
                    # still queued on disk: it comes back at the next start
                    log.error("spool: cannot remove envelope {queue_id}: {error}", queue_id=qid, error=e)
                    with self._lock:
                        self._removing.discard(qid)
                    continue
                gone.append(qid)
            batch = gone
            if not batch:
                continue
            try:
                self.envelopes_sync.sync(patience=patience)
            except OSError as e:
                # the envelopes' removal may not be durable: keep the
                # messages (recover() deletes them once they are orphans)
                log.error("spool: cannot sync envelopes/, {count} message file(s) kept: {error}", count=len(batch), error=e)
                with self._lock:
                    self._removing.difference_update(batch)
                continue
            for qid in batch:
                try:
                    os.unlink(self.message_path(qid))
                except FileNotFoundError:
                    pass
                except OSError as e:
                    log.error("spool: cannot remove message {queue_id}: {error}", queue_id=qid, error=e)
            with self._lock:
                self._removing.difference_update(batch)

    def drain(self) -> None:
        """Wait until every removed message's file is gone (tests, shutdown, recovery)."""
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
        Read one envelope.

        @raise KeyError: no such message.
        @raise EnvelopeFormatError: the file is not a valid envelope.
        """
        if not is_queue_id(queue_id) or queue_id in self._removing:
            raise KeyError(queue_id)
        try:
            with open(self.envelope_path(queue_id), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise KeyError(queue_id)
        env = Envelope.from_json(raw)
        if env.queue_id != queue_id:
            raise EnvelopeFormatError("queue_id does not match the file name")
        return env

    def queue_ids(self) -> list[str]:
        """Ids of all queued messages, oldest first."""
        ids = []
        for name in os.listdir(os.path.join(self.path, "envelopes")):
            if name.endswith(".json") and is_queue_id(name[:-5]):
                ids.append(name[:-5])
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

    def recover(self) -> list[Envelope]:
        """
        Make the spool consistent after a start or a crash and return every
        queued envelope that still has pending recipients.

        - C{tmp/} is emptied: nothing in it was ever acknowledged.
        - a message in C{new/} with no envelope was never committed: removed.
        - an envelope that cannot be parsed, or whose message is missing,
          is moved to C{corrupt/} and logged, never deleted.
        - an envelope with no pending recipient (crash during removal) is
          removed with its message.
        """
        self.drain()
        tmp = os.path.join(self.path, "tmp")
        for name in os.listdir(tmp):
            try:
                os.unlink(os.path.join(tmp, name))
            except IsADirectoryError:
                pass
        queued = set()
        pending = []
        messages = set(os.listdir(os.path.join(self.path, "new")))  # one listing, not a stat per envelope
        for name in sorted(os.listdir(os.path.join(self.path, "envelopes"))):
            path = os.path.join(self.path, "envelopes", name)
            qid = name[:-5] if name.endswith(".json") else ""
            if not is_queue_id(qid):
                self._quarantine(path, "not an envelope file name")
                continue
            try:
                env = self.load(qid)
            except (KeyError, EnvelopeFormatError, OSError) as e:
                self._quarantine(path, f"unreadable envelope: {e}")
                # its message was acknowledged: keep it next to the envelope
                if qid in messages:
                    self._quarantine(self.message_path(qid), "message of an unreadable envelope")
                continue
            if qid not in messages:
                self._quarantine(path, "envelope without message")
                continue
            queued.add(qid)
            if env.done:
                self.remove(qid)
                continue
            pending.append(env)
        self.drain()
        for name in os.listdir(os.path.join(self.path, "new")):
            if name not in queued:
                path = os.path.join(self.path, "new", name)
                try:
                    os.unlink(path)
                except OSError as e:
                    if e.errno != errno.ENOENT:
                        raise
        if self.fsync:
            _fsync_dir(os.path.join(self.path, "new"))
        return pending
