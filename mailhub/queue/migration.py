"""
The conversion of the first spool layout (format 1: C{new/ID} holding the
message and C{envelopes/ID.json} its envelope, as mailhub queued before
queue files) into queue files.

Owns: that conversion, and C{SPOOL/convert.lock} (L{conversion_lock}),
which the daemon and the queue tool take so that they never convert (or
clean up C{tmp/}) at once.  A spool without C{new/} costs one C{stat}.

Must not touch: the reactor, the network, queue files already in
C{queue/} (a conversion links, never replaces), the spool's removal
machinery.  Called by L{mailhub.queue.spool.Spool.migrate} and
L{mailhub.queue.spool.Spool.recover}.
"""

from __future__ import annotations

import fcntl
import os
from typing import TYPE_CHECKING

from twisted.logger import Logger

from mailhub.envelope import EnvelopeFormatError
from mailhub.queue import durable
from mailhub.queue.durable import unlink_logged, unlink_quietly
from mailhub.queue.queuefile import CHUNK, is_queue_id, parse_envelope, queue_file_trailer, read_queued_envelope

if TYPE_CHECKING:  # pragma: no cover
    from mailhub.queue.spool import Spool

__all__ = ["conversion_lock", "migrate", "convert"]

log = Logger()


def conversion_lock(spool_path: str, blocking: bool) -> int:
    """
    An exclusive C{flock} on C{SPOOL/convert.lock}, held while the first
    layout is converted and C{tmp/} is emptied at start-up, so the
    daemon and a queue tool never convert (or clean up) at once; the
    caller closes the descriptor returned to release it.

    @raise BlockingIOError: C{blocking} is false and another process holds it.
    """
    fd = os.open(os.path.join(spool_path, "convert.lock"), os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BaseException:
        os.close(fd)
        raise
    return fd


def migrate(spool: Spool, blocking: bool = True) -> int:
    """
    Convert the messages of C{spool} queued in the first layout into queue
    files; return how many.  Runs under L{conversion_lock} (see there for
    C{blocking}).
    """
    if not os.path.isdir(os.path.join(spool.path, "new")):
        return 0
    lock = conversion_lock(spool.path, blocking)
    try:
        return convert(spool)
    finally:
        os.close(lock)


def convert(spool: Spool) -> int:
    """
    L{migrate}, its lock (L{conversion_lock}) held.  Each message is
    written and made durable in C{queue/} before its old files go, so a crash meanwhile leaves
    both copies and the next run deletes C{new/ID}, and the envelope
    file only if it is still the copy of the one in the queue file (if
    it differs, the daemon has updated it since: it stays, as the
    message's changed envelope).  A message in C{new/} without an envelope was never
    committed and is deleted; an unreadable envelope goes to
    C{corrupt/} with its message.  C{new/} is removed when empty, so
    this costs one C{stat} afterwards.
    """
    new = os.path.join(spool.path, "new")
    try:
        names = sorted(os.listdir(new))
    except FileNotFoundError:
        return 0
    queued = set(os.listdir(os.path.join(spool.path, "queue")))
    moved: list[str] = []
    for name in names:
        old = os.path.join(new, name)
        if name in queued:
            continue  # converted before a crash: only new/ID is left to delete
        if not is_queue_id(name):
            spool.quarantine(old, "not a queue id")
            continue
        try:
            with open(spool.envelope_path(name), "rb") as f:
                env = parse_envelope(f.read(), name)
        except FileNotFoundError:
            unlink_logged(old)  # never committed
            continue
        except (EnvelopeFormatError, OSError) as e:
            spool.quarantine(spool.envelope_path(name), f"unreadable envelope: {e}")
            spool.quarantine(old, "message of an unreadable envelope")
            continue
        tmp = os.path.join(spool.path, "tmp", name + ".convert")
        unlink_quietly(tmp)
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
                if spool.fsync:
                    os.fsync(dst.fileno())
            # link, not rename: never replaces a queue file that is already there
            os.link(tmp, spool.message_path(name))
        except FileExistsError:
            queued.add(name)
            continue
        except IsADirectoryError:
            spool.quarantine(old, "not a regular file")
            spool.quarantine(spool.envelope_path(name), "envelope of an unreadable message")
            continue
        finally:
            unlink_quietly(tmp)
        moved.append(name)
    if spool.fsync:
        durable.fsync_dir(os.path.join(spool.path, "queue"))
    # Now every message of new/ is durable in queue/ (or was never
    # committed): the old files go.  The envelope of a message converted
    # just now only repeats the copy in its queue file.
    for name in moved:
        unlink_logged(spool.envelope_path(name))
    for name in names:
        if name in queued and name not in moved:
            _drop_envelope_copy(spool, name)
    for name in names:
        if name in moved or name in queued:
            unlink_logged(os.path.join(new, name))
    if spool.fsync:
        durable.fsync_dir(os.path.join(spool.path, "envelopes"))
    unlink_logged(new, os.rmdir)
    if moved:
        log.info("spool: converted {count} message(s) to queue files", count=len(moved))
    return len(moved)


def _drop_envelope_copy(spool: Spool, queue_id: str) -> None:
    """
    Delete C{envelopes/ID.json} of a message converted before a crash
    if it is byte for byte the envelope in its queue file (the old
    envelope, which the conversion would have deleted); one that
    differs is the daemon's later update and stays.
    """
    try:
        with open(spool.envelope_path(queue_id), "rb") as f:
            copy = f.read()
        queued = read_queued_envelope(spool.message_path(queue_id))
    except (OSError, KeyError, EnvelopeFormatError):
        return
    if copy == queued:
        unlink_logged(spool.envelope_path(queue_id))
