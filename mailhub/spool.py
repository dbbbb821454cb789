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
Removal order is the reverse: envelope first, then message.

Must not touch: the reactor, clocks, the network.  All calls are
synchronous; callers decide in which thread they run.
"""

from __future__ import annotations

import errno
import os
import secrets
import time
from collections.abc import Iterator

from twisted.logger import Logger

from .envelope import Envelope, EnvelopeFormatError

__all__ = ["Spool", "SpoolWriter", "new_queue_id", "is_queue_id"]

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
    tail = "".join(secrets.choice(_ID_ALPHABET) for _ in range(6))
    return "".join(reversed(head)) + tail


def is_queue_id(text: str) -> bool:
    """Whether C{text} could be a queue id (used to refuse path tricks)."""
    return 8 <= len(text) <= 64 and all(c in _ID_ALPHABET for c in text)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    A message being received.  Bytes go straight to a file in C{tmp/} so
    memory stays bounded whatever the message size.
    """

    def __init__(self, spool: "Spool", queue_id: str) -> None:
        self.spool = spool
        self.queue_id = queue_id
        self.size = 0
        self._tmp = os.path.join(spool.path, "tmp", queue_id + ".msg")
        self._file = open(self._tmp, "xb", buffering=0)
        self._closed = False

    def write(self, data: bytes) -> None:
        """Append C{data}.  Raises C{OSError} (e.g. ENOSPC) to the caller."""
        # An unbuffered file may write less than asked (e.g. disk nearly
        # full): loop, or the message is silently truncated.
        view = memoryview(data)
        while view:
            view = view[self._file.write(view) :]
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
        if not self._closed:
            self._file.close()
            self._closed = True
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
                _fsync_dir(os.path.join(self.path, "new"))
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
            _fsync_dir(os.path.join(self.path, "envelopes"))

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
        if not os.path.exists(self.message_path(envelope.queue_id)):
            raise KeyError(envelope.queue_id)
        self._write_envelope(envelope)

    def remove(self, queue_id: str) -> None:
        """Dequeue a message: envelope first, so a crash leaves an orphan, not a ghost."""
        if not is_queue_id(queue_id):
            raise KeyError(queue_id)
        try:
            os.unlink(self.envelope_path(queue_id))
        except FileNotFoundError:
            pass
        # The envelope's removal must be durable before the message goes,
        # or a crash could keep the envelope and lose the message.
        if self.fsync:
            _fsync_dir(os.path.join(self.path, "envelopes"))
        try:
            os.unlink(self.message_path(queue_id))
        except FileNotFoundError:
            pass

    # -- reading ------------------------------------------------------------------

    def load(self, queue_id: str) -> Envelope:
        """
        Read one envelope.

        @raise KeyError: no such message.
        @raise EnvelopeFormatError: the file is not a valid envelope.
        """
        if not is_queue_id(queue_id):
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
        return sorted(ids)

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
        tmp = os.path.join(self.path, "tmp")
        for name in os.listdir(tmp):
            try:
                os.unlink(os.path.join(tmp, name))
            except IsADirectoryError:
                pass
        queued = set()
        pending = []
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
                if os.path.exists(self.message_path(qid)):
                    self._quarantine(self.message_path(qid), "message of an unreadable envelope")
                continue
            if not os.path.exists(self.message_path(qid)):
                self._quarantine(path, "envelope without message")
                continue
            queued.add(qid)
            if env.done:
                self.remove(qid)
                continue
            pending.append(env)
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
