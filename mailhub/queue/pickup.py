"""
The daemon side of the pickup area: turning pickup files into queued messages.

Owns: L{PickupService} (at start, on inotify events and on a timer it
scans C{SPOOL/pickup/new/}, queues each file through the spool and
unlinks it after the commit; anything that is not a valid pickup file is
moved to C{SPOOL/corrupt/}).  The file format and the writer used by
mailhub-sendmail are in L{mailhub.queue.pickupfile}.

Must not touch: the rest of the spool except through L{Spool}'s public API
(C{new_message} / C{commit}); delivery and retry decisions (the scheduler's).
"""

from __future__ import annotations

import email.utils
import errno
import os
import pwd
import secrets
import stat
from collections.abc import Callable
from typing import Any, BinaryIO

from twisted.application import service
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailhub.config import default_hostname
from mailhub.envelope import Envelope, Recipient
from mailhub.maillog import mail_event
from mailhub.queue.pickupfile import (
    DIR_MODE,
    MAX_HEADER,
    PickupFormatError,
    PickupHeader,
    ensure_pickup_dirs,
    is_pickup_name,
    pickup_dirs,
    read_header,
)
from mailhub.queue.spool import Spool
from mailhub.rfc5322 import after_trace_header, trace_header

__all__ = ["PickupService"]

log = Logger()

_CHUNK = 65536


class _EntryError(Exception):
    """One pickup entry cannot be read or moved now; the other entries are not affected."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def _kind(mode: int) -> str:
    """What a non-regular directory entry is, for the log line of its quarantine."""
    for test, what in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISLNK, "symbolic link"), (stat.S_ISCHR, "device"), (stat.S_ISBLK, "device")):
        if test(mode):
            return f"not a regular file ({what})"
    return "not a regular file"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


def _default_notifier(clock: Any) -> Any:
    """A started INotify on C{clock} (the reactor), or C{None} where unavailable."""
    try:
        from twisted.internet import inotify
    except ImportError:
        return None
    try:
        notifier = inotify.INotify(reactor=clock)
    except Exception:  # INotifyError, or a reactor without file descriptors
        return None
    notifier.startReading()
    return notifier


class PickupService(service.Service):
    """
    Moves pickup files into the queue: at start, whenever inotify reports a
    file in C{pickup/new/}, and on a timer (every C{poll_interval} seconds
    when inotify is unavailable; every C{rescan_interval} seconds anyway, to
    survive an inotify queue overflow and to retry after a full disk).

    Each file becomes a normal queued message (C{Spool.new_message} /
    C{commit}) with a C{Received:} header naming the file owner's uid; the
    pickup file is unlinked only after the commit (at-least-once).  The
    pickup file name and owner uid are recorded in C{envelope.client}; at
    start, a file already recorded in the queue (crash between commit and
    unlink) is removed instead of being queued twice.

    @param resolve_recipient: maps a recipient address to its final
        delivery addresses (aliases, extensions) like the SMTP server's
        policy does; it must return C{[address]} for addresses it does not
        handle.  If it raises, the address is queued unresolved and the
        delivery outcome decides (a bounce, by the scheduler).
    @param notifier_factory: C{clock -> INotify-like or None}; tests pass a fake.
    """

    name = "pickup"  # type: ignore[assignment]  # Twisted's Service says name = None, unannotated

    def __init__(
        self,
        spool: Spool,
        enqueue: Callable[[Envelope], None],
        clock: IReactorTime,
        max_size: int,
        resolve_recipient: Callable[[str], list[str]] | None = None,
        hostname: str | None = None,
        notifier_factory: Callable[[Any], Any] = _default_notifier,
        poll_interval: float = 1.0,
        rescan_interval: float = 60.0,
        dir_mode: int = DIR_MODE,
        gid: int | None = None,
    ) -> None:
        self.spool = spool
        self.enqueue = enqueue
        self.clock = clock
        self.max_size = max_size
        self.resolve_recipient = resolve_recipient
        self.hostname = hostname or default_hostname()
        self.notifier_factory = notifier_factory
        self.poll_interval = poll_interval
        self.rescan_interval = rescan_interval
        self.dir_mode = dir_mode
        self.gid = gid
        self.tmp_dir, self.new_dir = pickup_dirs(spool.path)
        self._notifier: Any = None
        self._timer: Any = None
        self._soon: Any = None
        self._recovered: set[tuple[str, int]] = set()  # queued before a restart
        self._stuck: set[tuple[str, int]] = set()  # queued, but unlink failed

    # -- lifecycle ------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        ensure_pickup_dirs(self.spool.path, self.dir_mode, self.gid)
        self._clean_tmp()
        # Read the queue now, before any delivery could remove an envelope
        # whose pickup file survived a crash between commit and unlink.
        if os.listdir(self.new_dir):
            for env in self.spool:
                name, uid = env.client.get("pickup"), env.client.get("uid")
                if isinstance(name, str) and isinstance(uid, int):
                    self._recovered.add((name, uid))
        self._notifier = self.notifier_factory(self.clock)
        if self._notifier is not None:
            from twisted.internet import inotify
            from twisted.python.filepath import FilePath

            self._notifier.watch(
                FilePath(self.new_dir),
                mask=inotify.IN_MOVED_TO | inotify.IN_CLOSE_WRITE,
                callbacks=[self._changed],
            )
        # First scan on the first reactor turn: every service has started.
        self._schedule(0)

    def stopService(self) -> Any:
        for call in (self._timer, self._soon):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._soon = None
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None
        return super().stopService()

    def _clean_tmp(self) -> None:
        """Files in pickup/tmp/ older than a day are abandoned submissions."""
        now = self.clock.seconds()
        for name in os.listdir(self.tmp_dir):
            path = os.path.join(self.tmp_dir, name)
            try:
                if now - os.lstat(path).st_mtime > 86400:
                    os.unlink(path)
            except OSError:
                pass

    def _changed(self, _watch: Any, _path: Any, _mask: int) -> None:
        self._schedule(0)

    def _schedule(self, delay: float) -> None:
        if delay == 0:
            if self._soon is None or not self._soon.active():
                self._soon = self.clock.callLater(0, self.scan)
            return
        if self._timer is None or not self._timer.active():
            self._timer = self.clock.callLater(delay, self.scan)

    # -- work -------------------------------------------------------------------------------

    def scan(self) -> int:
        """Queue every file in C{pickup/new/}; return how many were queued."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        queued = 0
        retry = False
        try:
            names = sorted(os.listdir(self.new_dir))
        except OSError as e:
            log.error("pickup: cannot list {dir}: {error}", dir=self.new_dir, error=e)
            names = []
            retry = True
        for name in names:
            try:
                if self._pick(name):
                    queued += 1
            except _EntryError as e:
                # This entry only (unreadable, cannot be moved): the next
                # scan tries it again; the others go on now.
                log.error("pickup: {name}: skipped, will retry: {error}", name=name, error=e.error)
            except OSError as e:
                # Spool full or unwritable: leave the file, try again later.
                log.error("pickup: {name}: cannot queue, will retry: {error}", name=name, error=e)
                retry = True
                break
        self._recovered.clear()
        if self.running:
            if self._notifier is None:
                self._schedule(self.poll_interval)
            else:
                self._schedule(self.poll_interval if retry else self.rescan_interval)
        return queued

    def _quarantine(self, name: str, why: str) -> None:
        src = os.path.join(self.new_dir, name)
        target = os.path.join(self.spool.path, "corrupt", "pickup." + (name if is_pickup_name(name) else "file"))
        if os.path.lexists(target):
            target += "." + secrets.token_hex(4)
        try:
            os.rename(src, target)
        except FileNotFoundError:
            return
        except OSError as e:
            raise _EntryError(e)
        log.error("pickup: moved {path} to {target}: {why}", path=src, target=target, why=why)

    def _open_entry(self, name: str, path: str) -> int | None:
        """
        Open the pickup entry C{name} for reading; return its descriptor, or
        C{None} when it is gone or was moved to C{corrupt/} (anything but a
        regular file: directory, FIFO, socket, device, symbolic link).  The
        entry is looked at with C{lstat} first, so a FIFO or a device is
        never opened; the C{fstat} of the open descriptor decides (the entry
        may have been replaced in between).

        @raise _EntryError: it cannot be opened for another reason.
        """
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise _EntryError(e)
        if not stat.S_ISREG(st.st_mode):
            self._quarantine(name, _kind(st.st_mode))
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                self._quarantine(name, "not a regular file")
                return None
            raise _EntryError(e)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            self._quarantine(name, _kind(st.st_mode))
            return None
        return fd

    def _pick(self, name: str) -> bool:
        """
        Queue one pickup file.

        @raise _EntryError: this entry cannot be read now (the others can).
        @raise OSError: the spool cannot take the message (retry later).
        """
        path = os.path.join(self.new_dir, name)
        if not is_pickup_name(name):
            self._quarantine(name, "not a pickup file name")
            return False
        fd = self._open_entry(name, path)
        if fd is None:
            return False
        try:
            f = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        with f:
            st = os.fstat(fd)
            if st.st_nlink != 1:
                # A hard link to someone else's file would carry their uid.
                self._quarantine(name, f"{st.st_nlink} hard links")
                return False
            uid = st.st_uid
            if (name, uid) in self._stuck:
                return False
            if (name, uid) in self._recovered:
                os.unlink(path)
                log.info("pickup: {name}: already queued before a restart, removed", name=name)
                return False
            if st.st_size > self.max_size + MAX_HEADER:
                self._quarantine(name, f"message too large ({st.st_size} bytes, limit {self.max_size})")
                return False
            try:
                header = read_header(f)
            except PickupFormatError as e:
                self._quarantine(name, str(e))
                return False
            except OSError as e:
                raise _EntryError(e)
            if st.st_size - header.size > self.max_size:
                self._quarantine(name, f"message too large (limit {self.max_size} bytes)")
                return False
            env = self._queue(f, name, uid, header)
        try:
            os.unlink(path)
        except OSError as e:
            # Queued already: never queue this file again in this run.
            self._stuck.add((name, uid))
            log.error("pickup: {name}: queued as {queue_id} but cannot remove: {error}",
                      name=name, queue_id=env.queue_id, error=e)
        mail_event(
            "pickup",
            "{queue_id}: uid={uid} from=<{sender}> nrcpt={nrcpt} (pickup {pickup})",
            queue_id=env.queue_id,
            uid=uid,
            sender=env.sender,
            nrcpt=len(env.recipients),
            pickup=name,
            rcpts=[r.address for r in env.recipients],
        )
        self.enqueue(env)
        return True

    def _recipients(self, header: PickupHeader) -> list[Recipient]:
        out: list[Recipient] = []
        seen: set[str] = set()
        for original in header.recipients:
            addresses = [original]
            if self.resolve_recipient is not None:
                try:
                    addresses = list(self.resolve_recipient(original))
                except Exception as e:
                    log.warn("pickup: cannot resolve {rcpt}, queued as is: {error}", rcpt=original, error=e)
                    addresses = [original]
            for address in addresses:
                if address not in seen:
                    seen.add(address)
                    out.append(Recipient(address=address, original=original))
        return out

    def _queue(self, f: BinaryIO, name: str, uid: int, header: PickupHeader) -> Envelope:
        now = self.clock.seconds()
        writer = self.spool.new_message()
        user = _user_name(uid)
        try:
            clauses = [f"by {self.hostname} (mailhub, from userid {uid})", f"id {writer.queue_id}"]
            writer.write(trace_header(clauses, email.utils.formatdate(now, localtime=True)))
            eight_bit = False
            first = True
            while True:
                try:
                    chunk = f.read(_CHUNK)
                except OSError as e:
                    raise _EntryError(e)
                if not chunk:
                    break
                if first:
                    first = False
                    writer.write(after_trace_header(chunk))
                eight_bit = eight_bit or not chunk.isascii()
                writer.write(chunk)
            esmtp: dict[str, Any] = {"size": writer.size, "body": "8BITMIME" if eight_bit else "7BIT"}
            if not header.sender.isascii() or not all(r.isascii() for r in header.recipients):
                esmtp["smtputf8"] = True
            env = Envelope(
                queue_id=writer.queue_id,
                sender=header.sender,
                recipients=self._recipients(header),
                arrival=now,
                next_attempt=now,
                esmtp=esmtp,
                client={"protocol": "local", "user": user, "uid": uid, "pickup": name},
            )
        except BaseException:
            writer.abort()
            raise
        writer.commit(env)
        return env
